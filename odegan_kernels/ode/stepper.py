"""The closure-based ODE-GAN stepper: one explicit Runge-Kutta step of the players' gradient field per call.

A step integrates d(theta, phi)/dt = -grad of each player's own loss with an explicit Runge-Kutta method,
using two buffers beyond params and grads (x0: the step's start, acc: the running weighted sum).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import ops
from ..contract import Stage, apply_penalties, check_reg, due, penalty_specs, returned, stage_caller
from ..distributed import average_across_ranks
from ..flat import FlatParams, PopulationParams, place, view_at
from .populations import member_regs, per_segment
from .tableau import Tableau, compile_tableau, get_tableau

COUPLINGS = ("joint", "decoupled")
REG_PLACEMENTS = ("first_stage", "after_step")


def _step_sizes(h, n: int) -> list[float]:
    """h as one positive finite float per player, or a ValueError naming what is wrong."""
    hs = [h] * n if not isinstance(h, (list, tuple)) else list(h)
    if len(hs) != n:
        raise ValueError(f"h has {len(hs)} step sizes for {n} players")
    for x in hs:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"step size h must be a number (or one per player), got {x!r}")
        if not math.isfinite(x) or x <= 0:
            raise ValueError(f"step sizes must be positive and finite, got {hs}")
    return [float(x) for x in hs]


class ODEStepper(torch.optim.Optimizer):
    """ODE-GAN's optimiser: one explicit Runge-Kutta step of the players' gradient field per ``step``.

    A ``torch.optim.Optimizer`` with one param group per player (in FlatParams' order, D first); a group's
    ``lr`` is that player's step size h, so ``torch.optim.lr_scheduler`` schedulers, optimizer hooks and
    ``state_dict`` work as for any optimizer, and a change of step size (``stepper.h = ...``, a scheduler, or
    ``param_groups[i]["lr"]``) takes effect at the next step, also under ``cuda_graph=True``.

    Follows torch.optim's closure convention: ``step(closure)`` calls ``closure(stage)`` once per stage
    (``closure()`` if it takes no argument); the contract, what the closure fills and returns, is written
    down in contract.py. Before each call the stepper zeroes the gradients (one memset).

    Options reproduce the two reference implementations of the paper (its CIFAR-10 code and its colab); the
    data per stage is the closure's choice (``Stage.index`` tells it which stage it serves).

    Args:
        flat: the players' FlatParams; the stepper integrates every parameter in it.
        method: a name in TABLEAUS (euler, heun, midpoint, ralston, rk3, rk4) or a Tableau.
        h: the step size, one for every player or one per player (D's first).
        reg: lambda, the weight of ODE-GAN's regulariser g_reg = grad_theta ||dl_G/dphi||^2 (0: none), the
            penalty "g_reg" of stage 0 (it regularises player 0, D).
        reg_at: where g_reg's gradient goes: ``first_stage`` (folded into stage 1's gradient with weight
            lambda / b1, so later stage points see it; the CIFAR-10 code) or ``after_step`` (into a buffer the
            last stage applies: theta <- theta - h lambda g_reg after the step, g_reg taken at the step's start;
            the colab).
        coupling: ``joint`` (one RK step of the coupled system; every stage evaluates both players at the
            stage point) or ``decoupled`` (each player integrated with the other frozen at the step's start).
        penalties: the field's other gradient penalties (contract.Penalty, or {name: weight}): r1, r2, wgan_gp,
            consensus; part of the players' losses, so applied at every stage evaluation (lazy: every k steps).
        backend: the fused stage op's backend (ops.rk_stage): auto | triton | csrc | foreach | reference.
        cuda_graph: capture the whole step (every stage, forward, backward, the penalty) in one CUDA graph
            after ``graph_warmup`` eager steps, and replay it. With lazy penalties each set of penalties due is a
            kind of step with its own graph (and memory pool), warmed up, captured and replayed at its own steps.
        distributed: data parallel under torch.distributed: the flat gradients are averaged over the ranks
            once per stage (``process_group``: the group, default the world).
        compile: ``True``: the stage op through torch.compile (ode/compiled.py; h and lambda stay tensors, so a
            change of either replays the same compiled code); the closure's own work is the closure's to compile
            (game.compile_engine). ``"step"``: the whole step, every stage's closure call, penalty and stage op,
            traced as one graph (ode/compiled.py, CompiledStep) after one eager step; the closure must be
            traceable (its data drawn before the step, as tensors: no torch.Generator inside), and inside the
            trace ``stage.step`` is None. Not with cuda_graph or distributed (a ValueError says so).

    A step-size schedule is a torch scheduler on the stepper, e.g. ``LambdaLR(stepper, ode.cifar_schedule)``.
    """

    def __init__(
        self,
        flat: FlatParams,
        method: str | Tableau = "rk4",
        h: float | Sequence[float] = 0.04,
        reg: float = 0.0,
        reg_at: str = "first_stage",
        coupling: str = "joint",
        penalties=None,
        backend: str = "auto",
        cuda_graph: bool = False,
        graph_warmup: int = 3,
        distributed: bool = False,
        process_group=None,
        compile: bool | str = False,
    ) -> None:
        if not isinstance(flat, FlatParams):
            raise TypeError(
                f"ODEStepper needs a FlatParams (the players' flattened parameters), got {type(flat).__name__}"
            )
        self.flat = flat
        self.tableau = get_tableau(method)
        self._stages = compile_tableau(self.tableau)
        nseg = len(flat.segments)
        hs = _step_sizes(per_segment(flat, h), nseg)
        self._member_regs = None  # a population's lambda per member (populations.py); None for one pair
        if isinstance(flat, PopulationParams):
            self._member_regs = member_regs(flat, reg)
            reg = max(self._member_regs)
        reg = check_reg(reg)
        if reg_at not in REG_PLACEMENTS:
            raise ValueError(f"reg_at must be one of {REG_PLACEMENTS}, got {reg_at!r}")
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        if reg > 0 and reg_at == "first_stage" and self.tableau.b[0] == 0:
            raise ValueError(
                f"method {self.tableau.name!r} gives the first stage no weight (b1 = 0), so g_reg cannot be "
                "folded into it; use reg_at='after_step'"
            )
        groups = [{"params": flat.parameters(i), "lr": hs[i], "player": flat.names[i]} for i in range(nseg)]
        super().__init__(groups, {"lr": hs[0]})
        self._reg = reg
        self.penalties = penalty_specs(penalties)
        self.reg_at = reg_at
        self.coupling = coupling
        self.backend = backend
        self.steps = 0

        dev, dt = flat.device, flat.dtype
        self.x0 = flat.params.clone()
        self.acc = torch.zeros_like(flat.params)
        self._reg_buf = self._reg_views = None
        if self._member_regs is not None and reg > 0:  # every member's D: r over the whole buffer, e per member
            self._reg_buf = torch.zeros(flat.numel, dtype=dt, device=dev)
            self._reg_places = [place(p) for p in flat.player_params(0)]  # where its views lie, made at each use
        elif reg > 0 and (reg_at == "after_step" or compile == "step"):  # g_reg regularises player 0, the buffers'
            # first segment. A traced step takes it at the first stage through r too: lambda / b1 is then the stage
            # op's e, a tensor, so a change of lambda replays the same graph
            self._reg_buf = torch.zeros(flat.segments[0][1], dtype=dt, device=dev)  # r covers D's segment only
            self._reg_views = [
                self._reg_buf[e.offset : e.offset + e.param.numel()].view_as(e.param) for e in flat.layout(0)
            ]
        self._coeffs = torch.zeros(len(self._stages), nseg, 5, dtype=dt, device=dev)
        # The stage constants (a, b, c, d) in float64 on the device, and a float64 scratch for the rows: a change
        # of h is then written there from Python scalars alone (no copy from host memory, so no host sync).
        abcd = [(st.a, st.b, st.c, st.d) for st in self._stages]
        self._abcd64 = torch.tensor(abcd, dtype=torch.float64, device=dev)
        self._rows64 = torch.zeros(len(self._stages), nseg, 5, dtype=torch.float64, device=dev)
        self._coeff_key = None
        self.rolled_back = False  # whether the last step was interrupted and undone
        self.last_result = None  # what the last finished step returned
        self._scratch = None
        self.distributed = distributed
        self.process_group = process_group
        if distributed:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "distributed=True needs torch.distributed initialised first (torchrun, or dist.init_process_group)"
                )
        self.compiled = self.compiled_step = self._traced = None
        if compile is not False:
            from .compiled import CompiledStages, CompiledStep, TracedBuffers, why_not_compiled

            why = why_not_compiled(compile, cuda_graph, distributed)
            if why is not None:
                raise ValueError(why)
            self.compiled = CompiledStages(self._stages, flat.segments, traced=compile == "step")
            if compile == "step":
                self.compiled_step = CompiledStep(self._run_stages, flat.device)
                if not isinstance(flat, PopulationParams):  # a population's reads the whole buffers (TracedBuffers)
                    self._traced = TracedBuffers(flat, self._stages, self._reg_views)
                self._scratch = (torch.empty_like(flat.params), torch.empty_like(flat.grads))  # (made outside it)
        self.graph = None
        if cuda_graph:
            from ..graphs import StepGraph, check_capturable

            check_capturable(flat)
            self.graph = StepGraph(self._run_stages, warmup=graph_warmup)
        self._built = True

    # -- step sizes and the regulariser weight -----------------------------------------------------------
    @property
    def h(self) -> list[float]:
        """Each player's step size: the param groups' ``lr`` (set it, or let a scheduler set it)."""
        return [g["lr"] for g in self.param_groups]

    @h.setter
    def h(self, value: float | Sequence[float]) -> None:
        for g, v in zip(self.param_groups, _step_sizes(per_segment(self.flat, value), len(self.param_groups))):
            g["lr"] = v

    @property
    def reg(self) -> float:
        """lambda, the regulariser's weight (a population's: the largest member's; ``member_regs``, each member's);
        a change takes effect at the next step."""
        return self._reg

    @reg.setter
    def reg(self, value: float) -> None:
        if self._member_regs is not None:
            regs = member_regs(self.flat, value)
            if (max(regs) > 0) != (self._reg > 0):
                raise ValueError("a population's reg cannot switch the regulariser on or off: build a new ODEStepper")
            self._member_regs, self._reg = regs, max(regs)
            return
        value = check_reg(value)
        if (value > 0) != (self._reg > 0):
            raise ValueError(
                f"reg {self._reg} -> {value} switches the regulariser {'on' if value > 0 else 'off'}, which changes "
                "what each step computes: build a new ODEStepper with the new reg"
            )
        if value != self._reg and self.graph is not None and self.graph.captured:
            self.graph.reset()  # the first-stage weight lambda/b1 is part of the captured work: capture again
        self._reg = value

    @property
    def member_regs(self) -> tuple[float, ...] | None:
        """A population's lambda, one per member (None for one pair); set it through ``reg``."""
        return self._member_regs

    def zero_grad(self, set_to_none: bool = True) -> None:
        """One memset over the flat gradient buffer (``.grad`` stays a view of it: ``set_to_none`` is ignored)."""
        self.flat.zero_grad()

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_built", False):
            raise ValueError("an ODEStepper integrates the FlatParams it was built with: build a new one instead")
        super().add_param_group(param_group)

    # -- coefficients -------------------------------------------------------------------------------------
    @property
    def reg_weight(self) -> float:
        """The weight g_reg's gradient gets in the stage gradient it enters: lambda / b1 folded into stage 1, or
        lambda / b_s in the last stage's (through the stage op's e) after the step."""
        b = self.tableau.b[0] if self.reg_at == "first_stage" else self.tableau.b[-1]
        return self.reg / b if self.reg > 0 else 0.0

    def _refresh_coeffs(self) -> None:
        hs = tuple(self.h)
        key = (hs, self._reg, self._member_regs)
        if key == self._coeff_key:
            return  # nothing to copy: the common case costs no device work
        _step_sizes(list(hs), len(hs))  # a scheduler or a user may have set any value
        # tableau.stage_rows(stages, h, {0: reg_weight}) computed where the coefficients live, from Python scalars
        # (kernel arguments): the same float64 products, rounded once into the coefficients' dtype. In place: a
        # captured graph holds the coefficient tensor's address and replays with its new values.
        rows = self._rows64
        rows[..., 0:2].copy_(self._abcd64[:, None, 0:2].expand(-1, len(hs), -1))
        for seg, h in enumerate(hs):
            torch.mul(self._abcd64[:, 2:4], -h, out=rows[:, seg, 2:4])
        rows[..., 4].zero_()
        if self._member_regs is not None:  # each member's lambda / b on its D segment of the stage that takes r
            b = self.tableau.b[0] if self.reg_at == "first_stage" else self.tableau.b[-1]
            for k, lam in enumerate(self._member_regs):
                rows[0 if self.reg_at == "first_stage" else -1, k * self.flat.nplayers, 4].fill_(lam / b)
        elif self._reg_buf is not None:  # one pair's g_reg through r: D's segment of the stage that takes it
            rows[0 if self.reg_at == "first_stage" else -1, 0, 4].fill_(self.reg_weight)
        self._coeffs.copy_(rows)
        self._coeff_key = key

    def coefficients(self) -> torch.Tensor:
        """The fused stage op's coefficients for the step sizes and lambda as they are now (what the next step uses):
        ``[stage][player] = (a, b, c, d, e)``, the rows of tableau.stage_rows, in the parameters' dtype and device."""
        self._refresh_coeffs()
        return self._coeffs

    def buffers(self) -> list[torch.Tensor]:
        """The tensors this stepper holds beyond the parameters and gradients (memory accounting)."""
        held = [self.x0, self.acc, self._reg_buf, *(self._scratch or ())]  # (coefficient tables excluded)
        return [t for t in held if t is not None]

    # -- the step --------------------------------------------------------------------------------------
    def draws_per_step(self, data_per_stage: str = "fresh") -> int:
        """How many closure calls of one step draw data: one per step with data ``shared`` across the stages, else
        one per closure call (every stage; each player's own call in a decoupled stage after the first)."""
        n = len(self._stages)
        if data_per_stage == "shared":
            return 1
        return n if self.coupling == "joint" else 1 + self.flat.nplayers * (n - 1)

    def _due_key(self) -> tuple[str, ...]:
        """The names of the field penalties due at this step (for any player): a kind of step."""
        return tuple(due(self.penalties, self.steps, range(len(self.flat.segments))))

    def _stage(self, i: int, players: tuple[int, ...], kind: tuple[str, ...] | None = None) -> Stage:
        """Stage i of this step for ``players``: the field penalties due, and g_reg at stage 0 (last, so that a
        backward over several terms sums them in a fixed order). In a traced step (``kind``: the penalties due,
        _due_key) neither the step's number nor lambda is part of the trace: the penalties come from ``kind``,
        stage.step is None, and g_reg's weight is 1 (lambda / b is the stage op's coefficient e, a tensor)."""
        if kind is None:
            pens = due(self.penalties, self.steps, players)
            if i == 0 and self.reg > 0:
                pens["g_reg"] = self.reg
            return Stage(i, self.steps, players, pens)
        pens = due(self.penalties, None, players, names=kind)
        if i == 0 and self._reg_buf is not None:  # (lambda > 0 for the stepper's life: reg cannot switch it off)
            pens["g_reg"] = 1.0
        return Stage(i, None, players, pens)

    def _apply_penalties(self, out, stage: Stage) -> None:
        """The stage's penalty terms into its gradients; g_reg's into stage 1's (weight lambda / b1) or into the
        after-step buffer (the last stage applies it): the one path of contract.apply_penalties."""
        weights, into = dict(stage.penalties), None
        if "g_reg" in weights:
            if self._member_regs is not None:  # a population's g_reg: into r, weighted per member by the stage op
                # (views made here, so that a traced step reads r whole and no view of it made outside: TracedBuffers)
                weights["g_reg"], into = 1.0, {"g_reg": [view_at(self._reg_buf, w) for w in self._reg_places]}
            elif self._reg_views is None:
                weights["g_reg"] = self.reg_weight
            else:
                weights["g_reg"], into = 1.0, {"g_reg": self._reg_views}
        apply_penalties(out, self.flat, weights, stage.players, into)

    def step(self, closure=None):
        """Advance one step; returns what the closure returned at stage 0, detached (game/contract.py).

        With ``cuda_graph=True`` the returned tensors are the graph's static outputs: the next replay
        overwrites them (clone what you keep).
        """
        if closure is None or not callable(closure):
            raise TypeError("ODEStepper.step needs a closure: it evaluates the gradients once per RK stage")
        if (self.reg > 0 or self.penalties) and stage_caller(closure) is not closure:
            raise TypeError(
                "the penalties (reg > 0, or penalties=) need a closure that takes the Stage argument and returns "
                "them when the stage asks (stage.penalties: contract.py)"
            )
        with self.flat.stepping():  # no second step of these buffers meanwhile (re-entrant, or another optimiser)
            return self._step(closure)

    def _step(self, closure):
        self.flat.check(grads=False)  # parameters reassigned, moved or cast since flattening: named, before use
        self.flat.attach_grads()  # gradients a user detached between steps (zero_grad(set_to_none=True))
        self.x0.copy_(self.flat.params)  # the step's start as the parameters are now: edits between steps count
        self.flat.stash_buffers()  # BN statistics as at the step's start, for an unfinished step's undoing
        self._refresh_coeffs()  # outside any graph: replays read the coefficient tensor
        self.rolled_back, before = False, self.steps
        try:
            if self.compiled_step is not None:
                first = self.compiled_step(closure, self._due_key())
                self.flat.check_grads()  # what the trace skips (compiler.is_compiling), once after it
            elif self.graph is None:
                first = self._run_stages(closure)
            else:  # a step with a lazy penalty due does other work than one without: its own graph
                first = self.graph(closure, key=self._due_key())
            self.last_result = first
            self.steps += 1
        except BaseException:
            if self.steps == before:  # the step did not finish: back to its start (x0), buffers included
                self.flat.params.copy_(self.x0)
                self.flat.stash_buffers(restore=True)
                self.rolled_back = True
            raise
        return first

    def _run_stages(self, closure, kind: tuple[str, ...] | None = None):
        """The device work of one step: every stage's closure call and fused stage op (``kind``: a traced step's
        penalties due, _stage)."""
        flat = self.flat
        call = stage_caller(closure) if kind is None else closure  # traced: CompiledStep resolved it before the trace
        nstages = len(self._stages)
        nplayers = flat.nplayers
        everyone = tuple(range(nplayers))
        first = None
        for i in range(nstages):
            if self.coupling == "joint" or i == 0:
                if self._traced is None or kind is None:
                    flat.grads.zero_()  # attached at the step's start, checked after every call
                else:
                    self._traced.zero_grads()
                stage = self._stage(i, everyone, kind)
                out = call(stage)
                flat.check_grads()  # a closure that assigned p.grad = ... (or moved a p.data) would move nothing
                self._apply_penalties(out, stage)
                if i == 0:
                    first = returned(out)
            else:
                self._decoupled_gradients(call, i, kind)
            last = i == nstages - 1
            takes_r = i == 0 if self.reg_at == "first_stage" else last
            if self.distributed:
                self._average_across_ranks(last_stage=takes_r)
            if self._traced is not None and kind is not None:  # traced: the buffers through the leaves' views
                self._traced.stage(i, self.x0, self.acc, self._coeffs[i], takes_r)
                continue
            if self.compiled is not None:
                reg = self._reg_buf if takes_r else None
                self.compiled(i, flat.params, flat.grads, self.x0, self.acc, self._coeffs[i], reg)
                continue
            ops.rk_stage(
                flat.params,
                flat.grads,
                self.x0,
                self.acc,
                self._coeffs[i],
                flat.segments,
                reg_grad=self._reg_buf if takes_r else None,
                backend=self.backend,
            )
        return first

    def _average_across_ranks(self, last_stage: bool) -> None:
        """Data parallel: one all-reduce of the flat gradient buffer per stage (the regulariser already in
        it), and of the after-step regulariser buffer once per step, averaged over the ranks."""
        average_across_ranks(self.flat.grads, self.process_group)
        if last_stage and self._reg_buf is not None:
            average_across_ranks(self._reg_buf, self.process_group)

    def _decoupled_gradients(self, call, i: int, kind: tuple[str, ...] | None = None) -> None:
        """Each player's gradient at its own stage point with every other player at the step's start."""
        flat = self.flat
        if self._traced is not None and kind is not None:  # traced: the same, per leaf (TracedBuffers)

            def evaluate(q: int) -> None:
                stage = self._stage(i, (q,), kind)
                out = call(stage)
                flat.check_grads()
                self._apply_penalties(out, stage)

            self._traced.decoupled(self.x0, self._scratch, evaluate)
            return
        if self._scratch is None:
            self._scratch = (torch.empty_like(flat.params), torch.empty_like(flat.grads))
        point, gstash = self._scratch
        point.copy_(flat.params)
        owner = [s % flat.nplayers for s in range(len(flat.segments))]  # each segment's player (member-major)
        holds = ["point"] * len(flat.segments)  # what each segment of params holds now
        for q in range(flat.nplayers):
            for s, (a, b) in enumerate(flat.segments):  # copy only the segments that change
                want = "point" if owner[s] == q else "x0"
                if holds[s] != want:
                    flat.params[a:b].copy_((point if owner[s] == q else self.x0)[a:b])
                    holds[s] = want
            flat.grads.zero_()
            stage = self._stage(i, (q,), kind)
            out = call(stage)
            flat.check_grads()
            self._apply_penalties(out, stage)
            for lo, hi in flat.player_segments(q):
                gstash[lo:hi].copy_(flat.grads[lo:hi])
        flat.grads.copy_(gstash)
        # params are left as they are: the stage op that follows writes every one without reading it

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch.optim's state dict (the param groups, with each player's step size as ``lr``) plus the
        integrator's own: the step count, lambda and the options a checkpoint must agree on."""
        state = super().state_dict()
        state["ode"] = {
            "steps": self.steps,
            "reg": self._reg if self._member_regs is None else list(self._member_regs),
            "method": self.tableau.name,
            "reg_at": self.reg_at,
            "coupling": self.coupling,
            "penalties": [[p.name, p.weight, p.every] for p in self.penalties],
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "ode" not in state or "param_groups" not in state:
            raise ValueError(
                "not an ODEStepper state_dict of odegan-kernels 0.3 (no 'ode' and 'param_groups'); a trainer "
                "checkpoint of 0.1 or 0.2 is read through odegan_kernels.train.migrate_checkpoint"
            )
        ode = state["ode"]
        mine = self.state_dict()["ode"]
        for key in ("method", "reg_at", "coupling", "penalties"):  # penalties: [name, weight, every]
            theirs = [list(p) for p in ode[key]] if key == "penalties" else ode.get(key)
            if theirs != mine[key]:
                raise ValueError(f"checkpoint was made with {key}={theirs!r} but this stepper has {key}={mine[key]!r}")
        if self._member_regs is not None:
            super().load_state_dict({k: v for k, v in state.items() if k != "ode"})
            self.steps, self.reg, self._coeff_key = int(ode["steps"]), list(ode["reg"]), None
            return
        reg = check_reg(float(ode["reg"]))
        if (reg > 0) != (self._reg > 0):
            raise ValueError(
                f"checkpoint was made with reg={reg} but this stepper has reg={self._reg}: the regulariser is on in "
                "one and off in the other, which changes what a step computes"
            )
        super().load_state_dict({k: v for k, v in state.items() if k != "ode"})
        self.steps = int(ode["steps"])
        self.reg = reg
        self._coeff_key = None
