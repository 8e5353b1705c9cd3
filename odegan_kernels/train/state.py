"""What a run saves and restores (the Trainer's state, resume with declared changes), and how a signal stops it
at a step boundary."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from ..distributed import all_gather_objects
from .baselines import scheduler_state_at
from .checkpoint import CHECKPOINT, PREVIOUS, atomic_save, load_latest, set_aside
from .config import Config, renamed
from .interrupts import TrainingInterrupted, critical


class NonFiniteError(RuntimeError):
    """Training reached non-finite values (the message says where, and which checkpoint is the last good one)."""


class TrainerState:
    """The Trainer's state: ``local_state`` (this process), ``state_dict`` (every rank's random streams too),
    checkpoints, and resuming with the changes a user allowed."""

    def local_state(self) -> dict:
        """This process's state: everything a resumed run needs but the other ranks' random streams."""
        return {
            "step": self.step,
            "D": self.D.state_dict(),
            "G": self.G.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "problem": self.problem.state_dict(),
            "means": self.means.state_dict(),
            "pending": list(self.pending),
            "rng": self.streams.state(),
            "config": dataclasses.asdict(self.cfg),
        }

    def restore_local_state(self, state: dict) -> None:
        self.D.load_state_dict(state["D"])
        self.G.load_state_dict(state["G"])
        self.flat.check_modules(self.D, self.G)
        self.ema.load_state_dict(state.get("ema"))
        self.opt.load_state_dict(state["opt"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        elif self.scheduler is not None:  # a checkpoint from before schedulers were saved (0.1)
            self.scheduler.load_state_dict(scheduler_state_at(self.scheduler, int(state["step"])))
            self.opt.h = self.scheduler.get_last_lr()
        self.problem.load_state_dict(state.get("problem", {}))
        self.means.load_state_dict(state.get("means", {}), device=self.flat.device)
        self.pending = list(state.get("pending", []))
        self.streams.set_state(state["rng"])
        self.step = int(state["step"])

    def state_dict(self) -> dict:
        """Everything a resumed run needs; collective under torchrun (every rank's random streams)."""
        state = self.local_state()
        state["rng"] = all_gather_objects(state["rng"], self.world)  # one entry per rank
        return state

    def load_state_dict(self, state: dict, allow_change: bool = False) -> dict:
        """Resume from ``state``; returns the options that differ from the checkpoint's (only those declared
        changeable on resume, and only with ``allow_change``: the others must match)."""
        saved, changes = renamed(state.get("config", {})), {}
        for key in Config.resume_keys():
            old, new = _norm(saved.get(key)), _norm(getattr(self.cfg, key))
            if key in saved and old != new:
                if not (allow_change and key in Config.changeable_keys()):
                    how = " or pass --allow-change" if key in Config.changeable_keys() else ""
                    raise ValueError(
                        f"checkpoint was trained with {key}={saved[key]!r} but this run asks for "
                        f"{key}={getattr(self.cfg, key)!r}; use another --out or match the option{how}"
                    )
                changes[key] = [old, new]
        if "reg" in changes and (changes["reg"][0] > 0) != (changes["reg"][1] > 0) and self.cfg.optimizer == "ode":
            raise ValueError(
                f"reg {changes['reg'][0]} -> {changes['reg'][1]} turns ODE-GAN's regulariser "
                f"{'on' if changes['reg'][1] > 0 else 'off'}, which changes what every step computes; "
                "--allow-change takes a new weight, not this: start a new run (another --out)"
            )
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rng) != self.world:
            raise ValueError(
                f"checkpoint was written by {len(rng)} rank(s) but this run has {self.world}: each rank's "
                "data and noise streams continue from it, so resume with the same number of processes"
            )
        self.restore_local_state({**state, "rng": rng[self.rank]})
        if changes:
            self._apply_changes(changes)
        return changes

    def _apply_changes(self, changes: dict) -> None:
        """A resumed run's new h, h_g, reg or lr, in force from the next step."""
        cfg, opt = self.cfg, self.opt
        if "reg" in changes:
            opt.reg = cfg.reg
        if "h" in changes or "h_g" in changes or "lr" in changes:
            base = ([cfg.h] * 2 if cfg.h_g is None else [cfg.h, cfg.h_g]) if cfg.optimizer == "ode" else [cfg.lr] * 2
            groups = opt.param_groups
            if self.scheduler is not None:
                self.scheduler.base_lrs = list(base)
                base = [b * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch) for b in base]
            for g, lr in zip(groups, base):
                g["lr"] = lr

    def save_checkpoint(self) -> Path:
        """Write checkpoint.pt atomically, keeping the previous one as checkpoint.prev.pt; never over a good
        checkpoint with non-finite parameters. Under torchrun every rank calls this and rank 0 writes."""
        path = self.out / CHECKPOINT
        if not bool(torch.isfinite(self.flat.params).all()):  # the same on every rank: params are shared
            raise NonFiniteError(
                f"non-finite parameters at step {self.step}; kept the last good checkpoint {path}. "
                "Lower the step size h or raise reg."
            )
        state = self.state_dict()
        if self.is_main:
            with critical():  # the previous checkpoint's rename and the new one's happen together
                atomic_save(state, path, previous=self.out / PREVIOUS)
        return path

    def _interrupted(self, in_step: bool, rng_before: dict, data_before: dict) -> None:
        """An interrupt that stopped the run at once: make the state whole, checkpoint it (a single process), and
        raise TrainingInterrupted."""
        if in_step and getattr(self.opt, "rolled_back", False):  # replay the undone step's noise and data
            self.streams.set_state(rng_before)
            self.problem.load_state_dict(data_before)
        elif self.opt.steps > self.step:  # the optimiser's step finished, its bookkeeping had not begun
            self._after_opt_step()
        if self.world > 1:  # the ranks stop at different points: a collective save could hang
            raise TrainingInterrupted(
                f"rank {self.rank} interrupted at step {self.step}; the last checkpoint stands"
            ) from None
        path = self.save_checkpoint()
        raise TrainingInterrupted(
            f"interrupted at step {self.step}; saved {path}; rerun the same command to resume"
        ) from None

    def _stop_if_requested(self) -> None:
        """At a step boundary: when a signal asked to stop, checkpoint and raise TrainingInterrupted."""
        if self._stop.requested is not None:
            path = self.save_checkpoint()
            raise TrainingInterrupted(
                f"{self._stop.requested} at step {self.step}; saved {path}; rerun the same command to resume"
            )

    def maybe_resume(self, allow_change: bool = False) -> dict | None:
        """Resume from the run folder's newest usable checkpoint; the changed options, or None if there is none."""
        found = load_latest(self.out, self.cfg.device)
        if found is None:  # nothing to resume; an earlier run's files (one that ended before its first checkpoint)
            moved = set_aside(self.out) if self.is_main else None  # are kept, never overwritten
            if moved is not None:
                self._say(f"{self.out} has no checkpoint to resume from: the earlier run's files moved to {moved}")
            return None
        changes = self.load_state_dict(found[0], allow_change)
        if changes and self.is_main:
            self.metrics.write({"step": self.step, "event": "resumed_with_changes", "changes": changes})
        steps, at = self.cfg.steps, f"{self.out} is at step {self.step} of {self.cfg.steps}"
        if self.step >= steps:
            self._say(f"{at}: nothing left to do (--steps N continues it, --fresh starts over)")
        else:
            self._say(f"resuming: {at}" + (f", with the changes {changes}" if changes else ""))
        return changes

    def start_fresh(self) -> bool:
        """A run that ignores the folder's checkpoint: an earlier run's files are set aside first. False."""
        moved = set_aside(self.out) if self.is_main else None
        if moved is not None:
            self._say(f"fresh run: the earlier run's files in {self.out} moved to {moved}")
        return False

    def _say(self, line: str) -> None:
        if self.is_main:
            print(line, file=sys.stderr, flush=True)


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
