"""The Trainer: builds a run from its Config and runs (or resumes) it: steps, logs, evaluations, checkpoints.

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

from ..distributed import all_gather_objects, init_distributed
from ..flat import FlatParams
from ..graphs import StaticBatches
from ..problems import build_problem
from .baselines import build_optimizer, scheduler_state_at
from .checkpoint import atomic_save, load_checkpoint
from .closure import GameClosure, RandomStreams
from .config import Config, renamed, resolve_device
from .logging import IntervalMeans, MetricsLog, plot_metrics


class NonFiniteError(RuntimeError):
    """Training reached non-finite values (the message says where, and which checkpoint is the last good one)."""


class Trainer:
    """Builds the problem, the flat parameters, the optimiser and the closure from a Config; ``run()`` trains."""

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
        self.streams = RandomStreams(cfg.seed, self.rank, dev)
        eval_gen = torch.Generator(device=dev).manual_seed(10_000 + cfg.seed)
        self.fixed_z = torch.randn(cfg.eval_samples, self.problem.z_dim, generator=eval_gen, device=dev)
        k = self.problem.num_classes
        self.fixed_y = torch.arange(cfg.eval_samples, device=dev) % k if k else None  # every class in turn
        self.step = 0
        self.opt, self.scheduler = build_optimizer(cfg, self.flat, distributed=self.world > 1)
        static = None
        if cfg.cuda_graph:
            slots = len(self.opt.tableau.b) if cfg.data_per_stage == "fresh" else 1
            static = StaticBatches(slots, cfg.batch, self.problem.sample_shape, labels=bool(k), device=dev)
        self.game_closure = GameClosure(cfg, self.problem, self.streams.data, self.streams.z, static)
        self.closure = self.game_closure  # what the optimiser calls (wrap it to observe or inject)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=self.is_main)

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimiser step; returns its statistics (0-dim tensors on the device: losses, penalty)."""
        if self.game_closure.static is not None:
            self.game_closure.fill_static()
        result = self.opt.step(self.closure)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        return result.scalars()

    # -- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def samples(self) -> torch.Tensor:
        """Samples from the fixed latents (and labels), with BN running statistics."""
        was = self.G.training
        self.G.eval()
        try:
            if self.fixed_y is None:
                return torch.cat([self.G(z) for z in self.fixed_z.split(1024)])
            return torch.cat([self.G(z, y) for z, y in zip(self.fixed_z.split(1024), self.fixed_y.split(1024))])
        finally:
            self.G.train(was)

    def evaluate(self) -> dict:
        return {"step": self.step, **self.problem.evaluate(self.samples())}

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs; collective under torchrun (every rank's random streams)."""
        return {
            "step": self.step,
            "D": self.D.state_dict(),
            "G": self.G.state_dict(),
            "opt": self.opt.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "problem": self.problem.state_dict(),
            "rng": all_gather_objects(self.streams.state(), self.world),  # one entry per rank
            "config": dataclasses.asdict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = renamed(state.get("config", {}))
        for key in Config.resume_keys():
            if key in saved and _norm(saved[key]) != _norm(getattr(self.cfg, key)):
                raise ValueError(
                    f"checkpoint was trained with {key}={saved[key]!r} but this run asks for "
                    f"{key}={getattr(self.cfg, key)!r}; use another --out or match the option"
                )
        self.D.load_state_dict(state["D"])
        self.G.load_state_dict(state["G"])
        self.flat.check_modules(self.D, self.G)
        self.opt.load_state_dict(state["opt"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(
                state.get("scheduler") or scheduler_state_at(self.scheduler, int(state["step"]))
            )
            self.opt.h = self.scheduler.get_last_lr()
        self.problem.load_state_dict(state.get("problem", {}))
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rng) != self.world:
            raise ValueError(
                f"checkpoint was written by {len(rng)} rank(s) but this run has {self.world}: each rank's "
                "data and noise streams continue from it, so resume with the same number of processes"
            )
        self.streams.set_state(rng[self.rank])
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
        self.load_state_dict(load_checkpoint(path, self.cfg.device))
        return True

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, resume: bool = True) -> dict:
        from tqdm import tqdm

        cfg, main = self.cfg, self.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        resumed = resume and self.maybe_resume()
        if main:
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        if not resumed:
            self.metrics.clear()
            if main:
                self.metrics.write(self.evaluate())
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
        means = IntervalMeans()
        rng_before, data_before = self.streams.state(), self.problem.state_dict()
        try:
            while self.step < cfg.steps:
                # an interrupted step is replayed exactly on resume: its noise and its data
                rng_before, data_before = self.streams.state(), self.problem.state_dict()
                means.add(self.train_step())
                bar.update(1)
                want_ckpt = False
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    n = cfg.log_every if self.step % cfg.log_every == 0 else self.step % cfg.log_every
                    late = time.monotonic() - last_ckpt > 60 * cfg.ckpt_minutes
                    rec, want_ckpt = means.means(n, self.flat.params.new_tensor(float(late and main)), self.world)
                    bad = [k for k, v in rec.items() if not math.isfinite(v)]
                    if bad or not bool(torch.isfinite(self.flat.params).all()):
                        raise NonFiniteError(
                            f"non-finite {'values in ' + ', '.join(bad) if bad else 'parameters'} by step "
                            f"{self.step}; the last good checkpoint (if any) is {self.out / 'checkpoint.pt'}. "
                            "Lower the step size h or raise reg."
                        )
                    rate = (self.step - s0) / (time.perf_counter() - t0)
                    self.metrics.write({"step": self.step, **rec, "steps_per_s": rate})
                    bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items()})
                if main and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    result = self.evaluate()
                    self.metrics.write(result)
                    bar.write(
                        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
                    )
                if main and (self.step % cfg.plot_every == 0 or self.step == cfg.steps):
                    title = f"{cfg.problem} {cfg.method} step {self.step}"
                    self.problem.plot(self.samples(), self.out / f"samples_{self.step:07d}.png", title)
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
            self.streams.set_state(rng_before)
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
