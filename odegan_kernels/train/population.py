"""A population run's parts: each member's Config (its seed, h, lambda), the population's flat parameters and
optimiser built from them, and the closure that draws every member's batch from that member's own random streams
and data (its own problem: the digits' loader order is its seed's), exactly as a solo run with its Config would
(train/closure.py's GameClosure, eager)."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from ..contract import PENALTIES, Penalty, Stage, StageResult
from ..flat import FlatParams
from ..game import Batch
from ..game.compiled import prepare_trace
from ..game.mlp import why_not
from ..game.population import PopulationAutograd, PopulationMLP
from ..ode.schedules import SCHEDULES
from ..problems import build_problem
from .baselines import BaselineOptimizer
from .closure import Predrawn, noise_std, traces_whole_step
from .config import resolve_device
from .ema import GeneratorAverage
from .state import RandomStreams

# the options members may differ in; every other option is the population's one
MEMBER_OPTIONS = ("seed", "h", "h_g", "reg", "r1", "r2", "wgan_gp", "consensus", "out")
# the problems a population runs: the toy and the image problems (resnet128's pair class-conditional)
POPULATION_PROBLEMS = ("mog", "digits", "cifar10", "imagefolder")


def check_members(cfgs) -> None:
    """Refuse a population whose members differ in anything but MEMBER_OPTIONS (one line naming the option)."""
    if not cfgs:
        raise ValueError("a population needs at least one member (members >= 1)")
    first = dataclasses.asdict(cfgs[0])
    for k, cfg in enumerate(cfgs[1:], 1):
        for name, v in dataclasses.asdict(cfg).items():
            if name not in MEMBER_OPTIONS and v != first[name]:
                raise ValueError(
                    f"member {k} has {name}={v!r} but member 0 has {first[name]!r}: members may differ only in "
                    f"{MEMBER_OPTIONS} (one method, one architecture per population)"
                )
    c = cfgs[0]
    if c.problem not in POPULATION_PROBLEMS:
        raise ValueError(
            f"populations run {', '.join(POPULATION_PROBLEMS[:-1])} or {POPULATION_PROBLEMS[-1]}, not "
            f"problem={c.problem!r} (the rest is not built yet)"
        )
    if c.cuda_graph:
        raise ValueError("populations run eagerly or with compile=true, not cuda_graph=true (not built yet)")


def check_rank(rank, world) -> None:
    """rank and world as torch.distributed has them (a rank that says 0 on every process would give every rank the
    same streams and data); one process: rank 0 of 1."""
    if isinstance(rank, bool) or isinstance(world, bool) or not isinstance(rank, int) or not isinstance(world, int):
        raise TypeError(f"rank and world must be ints, got rank={rank!r}, world={world!r}")
    if world == 1 and rank == 0:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"world={world} needs torch.distributed initialised first (torchrun, or init_process_group)")
    if (rank, world) != (dist.get_rank(), dist.get_world_size()):
        raise ValueError(
            f"rank={rank}, world={world} but torch.distributed has rank {dist.get_rank()} of "
            f"{dist.get_world_size()}: pass dist.get_rank() and dist.get_world_size()"
        )


def penalty_weights(cfgs) -> tuple[dict, dict]:
    """(the optimiser's penalties {name: (weight, every)}, the engine's per-member weights {name: [K weights]}): a
    penalty every member weighs alike keeps that weight in the optimiser; one the members weigh differently gets
    weight 1 there and each member's own weight in the engine (PopulationAutograd's weights)."""
    pens, per_member, every = {}, {}, cfgs[0].penalty_every
    for name in (k for k in PENALTIES if k != "g_reg"):
        ws = [getattr(c, name) for c in cfgs]
        if len(set(ws)) == 1:
            pens[name] = (ws[0], every)
        else:
            pens[name], per_member[name] = (1.0, every), ws
    return pens, per_member


def population_engine(cfg, flat, D, G, weights=None):
    """The population's gradient engine: the batched hand-derived one where game/mlp.py's would run solo, else
    the vmapped autograd one (``grads='mlp'`` that cannot run is a ValueError naming the reason). ``weights``: the
    penalties the members weigh differently (penalty_weights), which only the autograd engine takes."""
    weights = weights or {}
    pens = [k for k in PENALTIES if k != "g_reg" and (getattr(cfg, k) or k in weights)]
    pens += ["g_reg"] if cfg.reg > 0 else []
    why = (
        "grads='autograd' was asked for"
        if cfg.grads == "autograd"
        else why_not(D, G, cfg.loss, cfg.reg_method, cfg.autocast, False, None, pens)
    )
    if why is None:
        return PopulationMLP(flat, D, G, cfg.loss)
    if cfg.grads == "mlp":
        raise ValueError(f"grads='mlp' cannot run here: {why}")
    if cfg.reg_method != "double_backward":
        raise ValueError("a population's autograd engine takes g_reg by double backward only")
    return PopulationAutograd(flat, D, G, cfg.loss, weights=weights, autocast=cfg.autocast)


class Population:
    """K members' runs as one batched run: ``Population(cfgs)`` builds each member's problem (its seed's initial
    parameters), one FlatParams(..., members=K), the population's optimiser (the ODE stepper with each member's h
    and lambda, or an Adam/SGD baseline) and the closure. ``step()`` advances every member one step.

    ``rank``, ``world`` (torch.distributed initialised by the caller): data parallel as a Trainer under torchrun,
    each rank drawing every member's batches from that member's streams for this rank (and, for the digits, its
    share of the data), the flat gradients (every member's) averaged over the ranks once per stage."""

    def __init__(self, cfgs, rank: int = 0, world: int = 1) -> None:
        cfgs = list(cfgs)
        for cfg in cfgs:
            cfg.validate()
            cfg.device = resolve_device(cfg.device)  # "auto", as a Trainer resolves it
        check_members(cfgs)
        if cfgs[0].compile and type(world) is int and world > 1:  # said before the problems and the broadcast
            raise ValueError(
                "compile=true with a population under torchrun (world > 1) is not supported yet: the per-stage "
                "all-reduce runs eagerly; run the population without compile"
            )
        check_rank(rank, world)
        self.cfgs, cfg = cfgs, cfgs[0]
        if cfg.threads > 0 and cfg.device == "cpu":
            torch.set_num_threads(cfg.threads)  # as the Trainer: the toy's small matrices run fastest on one
        self.problems = [build_problem(c.problem, c, rank, world) for c in cfgs]
        Ds, Gs = [p.D for p in self.problems], [p.G for p in self.problems]
        self.flat = FlatParams(D=Ds, G=Gs, members=len(cfgs), dtype=cfg.torch_dtype)
        if world > 1:  # every rank starts from rank 0's parameters, as a Trainer's
            torch.distributed.broadcast(self.flat.params, 0)
        self.streams = [RandomStreams(c.seed, rank, cfg.device) for c in cfgs]
        pens, weights = penalty_weights(cfgs)  # r1, r2, wgan_gp, consensus: per member where they differ
        self.engine = population_engine(cfg, self.flat, Ds[0], Gs[0], weights)
        # compile=true: the whole step traced (the batched hand-derived engine), else the stage op alone
        self.traced = traced = traces_whole_step(cfg, self.engine)
        if cfg.compile and not traced:
            warnings.warn(
                "compile=true with a population's autograd engine compiles the stage op alone: the players' vmapped "
                "passes run eagerly (grads='mlp' traces the whole step where the pair is a ReLU MLP)",
                stacklevel=2,
            )
        if cfg.optimizer == "ode":
            from ..ode.stepper import ODEStepper

            h = [[c.h, c.h if c.h_g is None else c.h_g] for c in cfgs]
            self.opt = ODEStepper(
                self.flat,
                cfg.method,
                h=[x for pair in h for x in pair],
                reg=[c.reg for c in cfgs],
                reg_at=cfg.reg_at,
                coupling=cfg.coupling,
                backend=cfg.backend,
                penalties=pens,
                distributed=world > 1,
                **({"compile": "step" if traced else True} if cfg.compile else {}),
            )
        else:
            if len({c.reg for c in cfgs}) > 1:
                raise ValueError("the Adam/SGD baselines of a population take one reg for every member")
            self.opt = BaselineOptimizer(
                self.flat, cfg.optimizer, cfg.lr, cfg.betas, cfg.reg, penalties=pens, distributed=world > 1
            )
        # closure: what the optimiser calls (wrap it to observe or inject); game_closure: the PopulationClosure
        self.closure = self.game_closure = PopulationClosure(
            cfg, self.problems, self.engine, self.streams, traced, cfgs, list(self.flat.stacked_buffers(1).values())
        )
        if traced:  # what the trace must find built, built now, so every step is traced (a resumed one included)
            prepare_trace(self.engine, cfg.torch_dtype, cfg.device)
            self.opt.compiled_step.warmed = True
        self.schedule = SCHEDULES[cfg.schedule] if cfg.optimizer == "ode" else None
        # each member's step sizes before the schedule (h, h_g), as a solo run's LambdaLR holds them (base_lrs)
        n = self.flat.nplayers
        self._base_h = [[g["lr"] for g in self.opt.param_groups[m * n : (m + 1) * n]] for m in range(len(cfgs))]

        k = len(cfgs)
        self.retries, self.factor = cfg.recover_retries, cfg.recover_factor
        self.member_steps = [0] * k  # the steps each member has taken (a retried step is counted once)
        self.failures = [0] * k
        self.frozen = [False] * k  # diverged past its retries (or finished): its parameters no longer move
        self.diverged = [False] * k
        self._start = torch.empty_like(self.flat.params)
        self._buffers = [b for q in range(self.flat.nplayers) for b in self.flat.stacked_buffers(q).values()]
        self._buffers_start = [torch.empty_like(b) for b in self._buffers]  # [K, ...] each: BN statistics
        # each member's average of G (cfg.ema; off at 0), folded in after each of its own steps, as a solo run's
        self.averages = [
            GeneratorAverage(self.flat, c.ema, c.ema_start, c.backend, player=f"m{m}.G") for m, c in enumerate(cfgs)
        ]
        self.set_step_sizes()

    def step(self):
        """One step of every member that still moves. A member whose parameters went non-finite is put back to its
        step's start (parameters and random streams) and retried at the next step with its h times
        ``recover_factor``; after ``recover_retries`` retries it is frozen and marked diverged. Members never
        interact, so the others' trajectories are exactly what they would be without it. A member's module buffers
        (BatchNorm's statistics) and data position are put back with its parameters, and a frozen member's stay as
        they were. The step-size schedule reads each member's own step count, as a solo run's scheduler would."""
        flat, k, block = self.flat, self.flat.members, self.flat.block
        self._start.copy_(flat.params)
        if self._buffers:
            torch._foreach_copy_(self._buffers_start, self._buffers)
        states = [(s.data.get_state(), s.z.get_state(), p.state_dict()) for s, p in zip(self.streams, self.problems)]
        self.game_closure.set_noise_std(self.member_steps)  # each member's instance noise at its own step count
        if self.traced:  # the traced step reads its batches drawn here, in the eager step's order
            self.game_closure.predraw(self.opt.draws_per_step(self.cfgs[0].data_per_stage))
        moments = self._optimizer_state()  # Adam's moments (a baseline): put back with a failed member's step
        lazy = self._lazy_per_member()
        try:
            out = self.opt.step(self.closure)
        except BaseException:  # an exception or interrupt inside: every member back to the step's start
            self._put_back_all(states, moments)
            raise
        finally:
            if lazy is not None:  # the population's own penalties and weights again
                self.opt.penalties, self.engine.weights = lazy
        self.game_closure.restore_buffers()  # after the last stage's penalties
        if self.traced:
            self.game_closure.check_predrawn()
        ok = torch.isfinite(flat.params.view(k, block)).all(1).tolist()
        for m in range(k):
            if not self.frozen[m] and ok[m]:
                self.member_steps[m] += 1
                self.averages[m].update(self.member_steps[m])
                continue
            flat.params[m * block : (m + 1) * block].copy_(self._start[m * block : (m + 1) * block])
            for b, b0 in zip(self._buffers, self._buffers_start):
                b[m].copy_(b0[m])
            if self.frozen[m]:
                continue
            self.streams[m].data.set_state(states[m][0])
            self.streams[m].z.set_state(states[m][1])
            self.problems[m].load_state_dict(states[m][2])
            if moments is not None:
                self._restore_optimizer_state(moments, m)
            self.failures[m] += 1
            if self.failures[m] > self.retries:
                self.frozen[m] = self.diverged[m] = True
            elif self.schedule is None:
                for g in self.opt.param_groups[m * flat.nplayers : (m + 1) * flat.nplayers]:
                    g["lr"] *= self.factor
        self.set_step_sizes()
        return out

    def _put_back_all(self, states, moments) -> None:
        """Every member at the start of the step that raised: parameters, BN statistics, random streams, data
        positions and a baseline's optimiser state, so that the step can be taken again as if never begun."""
        with torch.no_grad():
            self.flat.params.copy_(self._start)
            if self._buffers:
                torch._foreach_copy_(self._buffers, self._buffers_start)
        for m, (s, problem) in enumerate(zip(self.streams, self.problems)):
            s.data.set_state(states[m][0])
            s.z.set_state(states[m][1])
            problem.load_state_dict(states[m][2])
            if moments is not None:
                self._restore_optimizer_state(moments, m)
        self.game_closure.restore_buffers()

    def _optimizer_state(self):
        """A baseline's per-parameter state (Adam's moments and step counts) before a step, or None (the ODE stepper
        keeps no state across steps)."""
        opt = getattr(self.opt, "optimizer", None)
        if opt is None:
            return None
        return {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for p, st in opt.state.items()}

    def _restore_optimizer_state(self, saved, m: int) -> None:
        """Member m's parameters' optimiser state as it was before the step (none yet: none again)."""
        opt, n = self.opt.optimizer, self.flat.nplayers
        for group in opt.param_groups[m * n : (m + 1) * n]:
            for p in group["params"]:
                if p not in saved:
                    opt.state.pop(p, None)
                    continue
                for key, v in saved[p].items():
                    if torch.is_tensor(v):
                        opt.state[p][key].copy_(v)
                    else:
                        opt.state[p][key] = v

    def _lazy_per_member(self):
        """A lazy penalty (every k > 1) is due at a member's own step count, as in its solo run. While every moving
        member's count agrees with the population's on it (no retries), the optimiser's schedule is theirs and
        nothing changes (returns None). Otherwise, for this step, each lazy penalty due for some member is asked
        for at weight 1 and each member weighs its value w_k * k where it is due, 0 where not (the engine's
        per-member weights); returns (the optimiser's penalties, the engine's weights) to put back after."""
        specs, n = self.opt.penalties, self.opt.steps
        moving = [m for m in range(self.flat.members) if not self.frozen[m]]
        lazy = [p for p in specs if p.every > 1] if hasattr(self.engine, "weights") else []  # field penalties: autograd
        due = {p.name: [self.member_steps[m] % p.every == 0 for m in range(self.flat.members)] for p in lazy}
        if all(due[p.name][m] == (n % p.every == 0) for p in lazy for m in moving):
            return None
        saved = (specs, dict(self.engine.weights))
        new_specs, weights = [], dict(self.engine.weights)
        for p in specs:
            if p.every == 1:
                new_specs.append(p)
                continue
            own = self.engine.weights.get(p.name)
            ws = own.tolist() if own is not None else [p.weight] * self.flat.members
            now = [w * p.every if d and m in moving else 0.0 for m, (w, d) in enumerate(zip(ws, due[p.name]))]
            if any(now):
                new_specs.append(Penalty(p.name, 1.0, 1))
                weights[p.name] = torch.tensor(now, dtype=self.flat.dtype, device=self.flat.device)
        self.opt.penalties, self.engine.weights = tuple(new_specs), weights
        return saved

    def set_step_sizes(self) -> None:
        """Every member's step sizes for its next step: ``member_h`` times the schedule at the member's own step
        count, as a solo run's LambdaLR sets them (the ODE stepper; a baseline's lr stays its own)."""
        if self.schedule is None:
            return
        n = self.flat.nplayers
        for m in range(self.flat.members):
            for g, h in zip(self.opt.param_groups[m * n : (m + 1) * n], self.member_h(m)):
                g["lr"] = h * self.schedule(self.member_steps[m])

    def member_h(self, m: int) -> list[float]:
        """Member m's step sizes (D's, G's) before the schedule: its config's, times ``recover_factor`` per retry (the
        failure that freezes it takes no retry)."""
        hs = list(self._base_h[m])
        for _ in range(min(self.failures[m], self.retries)):
            hs = [h * self.factor for h in hs]
        return hs

    def freeze(self, member: int) -> None:
        """Stop moving ``member`` (it has taken all its steps); the others go on unchanged."""
        self.frozen[member] = True

    @property
    def h(self) -> list[float]:
        """Each member's step size of D now (after any retries' reductions)."""
        return [g["lr"] for g in self.opt.param_groups[:: self.flat.nplayers]]

    def member_params(self, k: int) -> torch.Tensor:
        """Member k's parameters as one flat buffer, laid out as a solo run's FlatParams."""
        b = self.flat.block
        return self.flat.params[k * b : (k + 1) * b]


class PopulationClosure:
    """``closure(stage)`` for a population: each member draws its real batch and z (and WGAN-GP's weights) from
    its own streams and its own problem's data, in the order GameClosure draws them, and the engine evaluates all
    members at once. ``traced`` (compile=true's traced step): the step's batches are drawn before it (predraw) and
    read in order inside the trace, as GameClosure's."""

    def __init__(self, cfg, problems, engine, streams, traced: bool = False, members=None, g_buffers=()) -> None:
        self.cfg, self.problems, self.engine, self.streams = cfg, list(problems), engine, streams
        # each member's Config (the penalties' weights may differ: a member draws WGAN-GP's weights only when its
        # own run would) and G's [K, ...] buffers (BN statistics), put back for a member whose run reuses the fakes
        self.members = list(members) if members is not None else [cfg] * len(self.problems)
        self.g_buffers = list(g_buffers)
        self._kept: list = []  # (buffer, member, its values before a consensus stage) to put back
        self.batch: Batch | None = None
        self.fake0 = None
        self.traced = traced
        self.pre = Predrawn()
        # instance noise: each member's std (a [K] tensor in the parameters' dtype, as a solo traced run's 0-dim one)
        self.sigma = None
        if cfg.instance_noise:
            self.sigma = torch.zeros(len(self.problems), device=cfg.device, dtype=cfg.torch_dtype)
        self._stds: list[float] | None = None

    def restore_buffers(self) -> None:
        """Put back the G statistics a consensus stage moved for members without consensus (see __call__)."""
        with torch.no_grad():
            for b, m, saved in self._kept:
                b[m].copy_(saved)
        self._kept = []

    def set_noise_std(self, steps) -> None:
        """Each member's instance-noise std for its next step, at ``steps[k]`` steps taken (its own count, as a solo
        run's stage.step); copied to the device only when it changes."""
        if self.sigma is None:
            return
        stds = [noise_std(self.cfg, s) for s in steps]
        if stds != self._stds:
            self.sigma.copy_(torch.tensor(stds, dtype=self.sigma.dtype))
            self._stds = stds

    def predraw(self, n: int) -> None:
        """Draw the next step's ``n`` batches (ODEStepper.draws_per_step) now, in the order the eager step draws
        them, for the traced step to read."""
        self.pre.fill(self._draw_now, n)

    def check_predrawn(self) -> None:
        """After a traced step: it read every batch drawn for it, no more."""
        self.pre.check()

    def _draw(self) -> Batch:
        return self.pre.next() if self.traced else self._draw_now()

    def _draw_now(self) -> Batch:
        cfg, dev, dt = self.cfg, self.cfg.device, self.cfg.torch_dtype
        xs, zs, ys, mixes, noises = [], [], [], [], []
        for s, problem in zip(self.streams, self.problems):
            x, y = problem.draw(cfg.batch, s.data)
            xs.append(x.to(dev))
            zs.append(torch.randn(cfg.batch, problem.z_dim, generator=s.z, device=dev, dtype=dt))
            if problem.num_classes:  # a class-conditional pair: the real batch's labels, then those to generate
                ys.append((y.to(dev), torch.randint(problem.num_classes, (cfg.batch,), generator=s.z, device=dev)))
            if any(c.wgan_gp for c in self.members):  # zeros (weight 0, unread) for a member whose run has none
                if self.members[len(zs) - 1].wgan_gp:
                    mixes.append(torch.rand(cfg.batch, generator=s.z, device=dev, dtype=dt))
                else:
                    mixes.append(torch.zeros(cfg.batch, device=dev, dtype=dt))
            if cfg.instance_noise:  # on the real batch, then on the fakes, as GameClosure draws them
                noises.append([torch.randn(xs[-1].shape, generator=s.z, device=dev, dtype=x.dtype) for _ in range(2)])
        noise = tuple(torch.stack(part) for part in zip(*noises)) if noises else None
        y_real, y_fake = (torch.stack(part) for part in zip(*ys)) if ys else (None, None)
        mix = torch.stack(mixes) if mixes else None
        return Batch(torch.stack(xs), torch.stack(zs), y_real, y_fake, mix=mix, noise=noise)

    def __call__(self, stage: Stage) -> StageResult:
        cfg = self.cfg
        if stage.index == 0 or cfg.data_per_stage == "fresh":
            self.batch, self.fake0 = self._draw(), None
        b = self.batch
        reuse = stage.players == (0,) and cfg.data_per_stage == "shared" and "consensus" not in stage.penalties
        self.restore_buffers()
        # a D-only stage that runs G for consensus: a member without it would reuse its fakes, G's BN statistics
        # untouched, so theirs are put back once the stage's penalties are applied (at the next call or the step's end)
        if stage.players == (0,) and cfg.data_per_stage == "shared" and not reuse and self.g_buffers:
            without = [m for m, c in enumerate(self.members) if not c.consensus]
            self._kept = [(b_, m, b_[m].clone()) for m in without for b_ in self.g_buffers]
        noise = b.noise
        if noise is not None:  # unit noise times each member's std
            sigma = self.sigma.view(-1, *[1] * (b.real.dim() - 1))
            noise = (noise[0] * sigma, noise[1] * sigma)
        batch = Batch(b.real, b.z, b.y_real, b.y_fake, mix=b.mix, noise=noise, fake=self.fake0 if reuse else None)
        out = self.engine(batch, stage.players, stage.penalties, losses=stage.index == 0)
        if stage.index == 0:
            self.fake0 = out.fake
        out.fake = None
        return out
