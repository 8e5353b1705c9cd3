"""The training loop: presets, ODE steps (or Adam/SGD baselines), logging, evaluation, checkpoints.

A run folder holds config.json (the resolved options), metrics.jsonl, sample plots and checkpoint.pt,
which is written atomically and resumed from automatically.

Under torchrun (WORLD_SIZE > 1) the run is data parallel: each rank draws its own batches (``batch`` per
rank and stage), the flat gradients are averaged once per stage, rank 0 alone writes the run folder, and
the checkpoint holds every rank's random streams so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from ..distributed import average_across_ranks, init_distributed
from ..flat import FlatParams
from ..game.autograd import game_gradients
from ..ode.stepper import ODEStepper
from ..problems import build_problem
from .checkpoint import atomic_save
from .config import Config, resolve_device
from .logging import plot_metrics


class NonFiniteError(RuntimeError):
    pass


class Trainer:
    """Builds the problem and the optimiser from a Config and runs (or resumes) training."""

    RESUME_KEYS = (
        "problem",
        "optimizer",
        "method",
        "h",
        "h_g",
        "reg",
        "penalty",
        "coupling",
        "data_per_stage",
        "schedule",
        "loss",
        "batch",
        "z_dim",
        "hidden",
        "seed",
        "arch",
        "image_size",
        "width",
    )

    def __init__(self, cfg: Config) -> None:
        cfg.validate()
        self.rank, self.world, cfg.device = init_distributed(resolve_device(cfg.device))
        self.is_main = self.rank == 0
        self.cfg = cfg
        if cfg.threads > 0 and cfg.device == "cpu":
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out)
        self.problem = build_problem(cfg.problem, cfg, self.rank, self.world)
        self.D, self.G = self.problem.D, self.problem.G
        self.flat = FlatParams([self.D, self.G])
        if self.world > 1:  # every rank starts from rank 0's parameters
            torch.distributed.broadcast(self.flat.params, 0)
        dev = torch.device(cfg.device)
        # each rank its own data and z streams; rank 0's are a single-process run's
        stream = cfg.seed * 2 + 1_000_003 * self.rank
        self.data_gen = torch.Generator(device="cpu").manual_seed(stream + 1)
        self.z_gen = torch.Generator(device=dev).manual_seed(stream + 2)
        eval_gen = torch.Generator(device=dev).manual_seed(10_000 + cfg.seed)
        self.fixed_z = torch.randn(cfg.eval_samples, self.problem.z_dim, generator=eval_gen, device=dev)
        k = self.problem.num_classes
        self.fixed_y = torch.arange(cfg.eval_samples, device=dev) % k if k else None  # every class in turn
        self.step = 0
        if cfg.optimizer == "ode":
            h = cfg.h if cfg.h_g is None else [cfg.h, cfg.h_g]
            self.opt = ODEStepper(
                self.flat,
                cfg.method,
                h=h,
                reg=cfg.reg,
                penalty=cfg.penalty,
                coupling=cfg.coupling,
                schedule=cfg.schedule,
                backend=cfg.backend,
                cuda_graph=cfg.cuda_graph,
                distributed=self.world > 1,
            )
        else:
            if cfg.cuda_graph:
                raise ValueError("cuda_graph applies to the ODE stepper (optimizer='ode') only")
            groups = [{"params": self.flat.parameters(i)} for i in range(2)]
            if cfg.optimizer == "adam":
                self.opt = torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)
            else:
                self.opt = torch.optim.SGD(groups, lr=cfg.lr)
        self._mlp = self._grads_engine()
        self._batch: dict = {}
        self._static_x = self._static_y = None  # graph mode: every stage's real batch (and labels)
        if cfg.cuda_graph:
            n = len(self.opt.tableau.b) if cfg.data_per_stage == "fresh" else 1
            # the shape comes from the problem: drawing a batch here would consume data
            self._static_x = torch.empty((n, cfg.batch, *self.problem.sample_shape), device=cfg.device)
            if k:
                self._static_y = torch.zeros((n, cfg.batch), dtype=torch.long, device=cfg.device)

    # -- data and gradients ----------------------------------------------------------------------------
    def _grads_engine(self):
        """The hand-derived gradients (mlp_grads.MLPPair) where cfg.grads allows and they apply, else None
        (autograd). Graph capture keeps autograd: one captured step already has no per-op overhead."""
        cfg = self.cfg
        if cfg.grads == "autograd":
            return None
        from ..game.mlp import pair_for

        pair, why = pair_for(self.D, self.G, cfg.loss, cfg.penalty_method, autocast=cfg.autocast)
        if why is None and cfg.cuda_graph:
            why = "cuda_graph=True captures the autograd step"
        if why is not None:
            if cfg.grads == "mlp":
                raise ValueError(f"grads='mlp' cannot run here: {why}")
            return None
        return pair

    def _fill_static(self) -> None:
        for i in range(self._static_x.shape[0]):
            x, y = self.problem.draw(self.cfg.batch, self.data_gen)
            self._static_x[i].copy_(x, non_blocking=True)
            if self._static_y is not None:
                self._static_y[i].copy_(y, non_blocking=True)

    def _draw(self, stage_index: int = 0) -> None:
        cfg = self.cfg
        k = self.problem.num_classes
        y_fake = None
        if self._static_x is not None:
            # graph mode: the batch comes from the static buffer; z (and the labels to generate) are drawn in
            # the graph from the device's default generator, which CUDA graphs advance on every replay
            i = stage_index if cfg.data_per_stage == "fresh" else 0
            x = self._static_x[i]
            y_real = self._static_y[i] if k else None
            z = torch.randn(cfg.batch, self.problem.z_dim, device=cfg.device)
            if k:
                y_fake = torch.randint(k, (cfg.batch,), device=cfg.device)
        else:
            x, y_real = self.problem.draw(cfg.batch, self.data_gen)
            x = x.to(cfg.device)
            z = torch.randn(cfg.batch, self.problem.z_dim, generator=self.z_gen, device=cfg.device)
            if k:
                y_real = y_real.to(cfg.device)
                y_fake = torch.randint(k, (cfg.batch,), generator=self.z_gen, device=cfg.device)
        self._batch = {"x": x, "z": z, "y_real": y_real, "y_fake": y_fake, "fake0": None}

    def closure(self, stage):
        """Fill the players' gradients at the current point (the stepper's closure)."""
        cfg = self.cfg
        if stage.index == 0 or cfg.data_per_stage == "fresh":
            self._draw(stage.index)
        b = self._batch
        # Decoupled D-only stages see G frozen at the step's start: with shared data, the samples G drew
        # at stage 0 are exactly the ones it would draw again, so reuse them.
        reuse = stage.players == (0,) and cfg.data_per_stage == "shared" and b["fake0"] is not None
        fake = b["fake0"] if reuse else None
        if self._mlp is not None:  # only stage 0's dict reaches the logs: leave the loss values out elsewhere
            out = self._mlp(b["x"], b["z"], cfg.loss, stage.players, stage.penalty, fake, values=stage.index == 0)
        else:
            out = game_gradients(
                self.D,
                self.G,
                b["x"],
                b["z"],
                cfg.loss,
                players=stage.players,
                penalty=stage.penalty,
                fake=fake,
                penalty_method=cfg.penalty_method,
                autocast=cfg.autocast,
                y_real=b["y_real"],
                y_fake=b["y_fake"],
            )
        if stage.index == 0:
            b["fake0"] = out["fake"]
        del out["fake"]
        return out

    def train_step(self) -> dict:
        if isinstance(self.opt, ODEStepper):
            if self._static_x is not None:
                self._fill_static()
            stats = self.opt.step(self.closure)
        else:
            from ..ode.stepper import Stage

            self.flat.zero_grad()
            pen = self.cfg.reg > 0
            stats = self.closure(Stage(0, self.step, (0, 1), pen))
            if pen and "penalty_grad" in stats:  # given directly (hand-derived, jvp, finite difference)
                d_grads = [p.grad for p in self.flat.parameters(0)]
                torch._foreach_add_(d_grads, stats.pop("penalty_grad"), alpha=self.cfg.reg)
            elif pen:
                penalty = stats.pop("penalty")
                stats["penalty"] = penalty.detach()
                (penalty * self.cfg.reg).backward(inputs=self.flat.parameters(0))
            if self.world > 1:
                average_across_ranks(self.flat.grads)
            self.opt.step()
        self.step += 1
        return stats

    # -- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def samples(self) -> torch.Tensor:
        was = self.G.training
        self.G.eval()  # BN running statistics for evaluation samples
        try:
            if self.fixed_y is None:
                return torch.cat([self.G(z) for z in self.fixed_z.split(1024)])
            return torch.cat([self.G(z, y) for z, y in zip(self.fixed_z.split(1024), self.fixed_y.split(1024))])
        finally:
            self.G.train(was)

    def evaluate(self) -> dict:
        return {"step": self.step, **self.problem.evaluate(self.samples())}

    # -- checkpoints -----------------------------------------------------------------------------------
    def rng_state(self) -> dict:
        cuda = self.flat.device.type == "cuda"
        return {
            "data": self.data_gen.get_state(),
            "z": self.z_gen.get_state(),
            "cuda": torch.cuda.get_rng_state(self.flat.device) if cuda else None,
        }

    def _all_ranks_rng(self) -> list[dict]:
        if self.world == 1:
            return [self.rng_state()]
        states = [None] * self.world
        torch.distributed.all_gather_object(states, self.rng_state())
        return states

    def set_rng_state(self, rng: dict) -> None:
        self.data_gen.set_state(rng["data"])
        self.z_gen.set_state(rng["z"])
        if rng.get("cuda") is not None and self.flat.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.flat.device)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "D": self.D.state_dict(),
            "G": self.G.state_dict(),
            "opt": self.opt.state_dict(),
            "problem": self.problem.state_dict(),
            "rng": self._all_ranks_rng(),  # one entry per rank (collective under torchrun)
            "config": dataclasses.asdict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("config", {})
        for key in self.RESUME_KEYS:
            if key in saved and _norm(saved[key]) != _norm(getattr(self.cfg, key)):
                raise ValueError(
                    f"checkpoint was trained with {key}={saved[key]!r} but this run asks for "
                    f"{key}={getattr(self.cfg, key)!r}; use another --out or match the option"
                )
        self.D.load_state_dict(state["D"])
        self.G.load_state_dict(state["G"])
        self.flat.check_modules(self.D, self.G)
        self.opt.load_state_dict(state["opt"])
        self.problem.load_state_dict(state.get("problem", {}))
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rng) != self.world:
            raise ValueError(
                f"checkpoint was written by {len(rng)} rank(s) but this run has {self.world}: each rank's "
                "data and noise streams continue from it, so resume with the same number of processes"
            )
        self.set_rng_state(rng[self.rank])
        self.step = int(state["step"])

    def save_checkpoint(self) -> Path:
        """Write checkpoint.pt atomically; never over a good checkpoint with non-finite parameters.

        Under torchrun every rank calls this (the random streams are gathered) and rank 0 writes.
        """
        path = self.out / "checkpoint.pt"
        if not bool(torch.isfinite(self.flat.params).all()):  # the same on every rank: params are shared
            raise NonFiniteError(
                f"non-finite parameters at step {self.step}; kept the last good checkpoint {path}. "
                "Lower the step size h or raise reg."
            )
        state = self.state_dict()
        if self.is_main:
            atomic_save(state, path)
        return path

    def maybe_resume(self) -> bool:
        path = self.out / "checkpoint.pt"
        if not path.exists():
            return False
        self.load_state_dict(torch.load(path, map_location=self.cfg.device, weights_only=False))
        return True

    # -- the loop ----------------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _interval_means(self, acc: dict, n: int, want_ckpt: bool) -> tuple[dict, bool]:
        """The logged statistics' means over the interval (and over the ranks), and whether rank 0 asks
        for a checkpoint: one host sync, and one all-reduce under torchrun, so every rank decides alike."""
        keys = list(acc)
        flag = self.flat.params.new_tensor(float(want_ckpt and self.is_main))
        vals = torch.stack([acc[k].float().reshape(()) for k in keys] + [flag])
        if self.world > 1:
            torch.distributed.all_reduce(vals)
            vals[:-1] /= self.world
        out = vals.tolist()
        return {k: v / n for k, v in zip(keys, out)}, out[-1] > 0

    def run(self, resume: bool = True) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        main = self.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        resumed = resume and self.maybe_resume()
        if main:
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        if not resumed and main:
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
            self.log(self.evaluate())
        last_ckpt = time.monotonic()
        t0, s0 = time.perf_counter(), self.step
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (cfg.progress and main),
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 30,
            desc=f"{cfg.problem} {cfg.optimizer}:{cfg.method}",
        )
        result: dict = {}
        acc: dict[str, torch.Tensor] = {}
        rng_before, data_before = self.rng_state(), self.problem.state_dict()
        try:
            while self.step < cfg.steps:
                # an interrupted step is replayed exactly on resume: its noise and its data
                rng_before, data_before = self.rng_state(), self.problem.state_dict()
                stats = self.train_step()
                for k, v in stats.items():
                    if isinstance(v, torch.Tensor):
                        acc[k] = acc[k] + v if k in acc else v.clone()
                bar.update(1)
                want_ckpt = False
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    n = cfg.log_every if self.step % cfg.log_every == 0 else self.step % cfg.log_every
                    rec, want_ckpt = self._interval_means(acc, n, time.monotonic() - last_ckpt > 60 * cfg.ckpt_minutes)
                    acc = {}
                    bad = [k for k, v in rec.items() if not math.isfinite(v)]
                    if bad or not bool(torch.isfinite(self.flat.params).all()):
                        raise NonFiniteError(
                            f"non-finite {'values in ' + ', '.join(bad) if bad else 'parameters'} by step "
                            f"{self.step}; the last good checkpoint (if any) is {self.out / 'checkpoint.pt'}. "
                            "Lower the step size h or raise reg."
                        )
                    rate = (self.step - s0) / (time.perf_counter() - t0)
                    self.log({"step": self.step, **rec, "steps_per_s": rate})
                    bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items()})
                if main and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    result = self.evaluate()
                    self.log(result)
                    bar.write(
                        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
                    )
                if main and (self.step % cfg.plot_every == 0 or self.step == cfg.steps):
                    self.problem.plot(
                        self.samples(),
                        self.out / f"samples_{self.step:07d}.png",
                        f"{cfg.problem} {cfg.method} step {self.step}",
                    )
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or want_ckpt:
                    self.save_checkpoint()
                    last_ckpt = time.monotonic()
        except KeyboardInterrupt:
            if self.world > 1:
                # the ranks stop at different points, so a collective save could hang: keep the last one
                bar.write(f"rank {self.rank} interrupted at step {self.step}; the last checkpoint stands")
                raise
            # the interrupted step was rolled back by the stepper: save what the completed steps reached
            bar.write(f"interrupted at step {self.step}: saving {self.out / 'checkpoint.pt'}")
            self.set_rng_state(rng_before)
            self.problem.load_state_dict(data_before)
            self.save_checkpoint()
            raise
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        if not main:
            return {"step": self.step, "rank": self.rank, "seconds": elapsed}
        if not result:  # resumed at or past cfg.steps: nothing ran, still report where the run stands
            result = self.evaluate()
        summary = {**result, "seconds": elapsed, "steps_per_s": (self.step - s0) / max(elapsed, 1e-9)}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_metrics(self.out)
        return summary


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
