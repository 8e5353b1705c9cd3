"""Divergence recovery: a copy of the last state that passed the divergence check, and on non-finite values a
rollback to it with a smaller step size, a bounded number of times; warnings when parameters run away."""

from __future__ import annotations

import copy
import math

import torch

from .checkpoint import CHECKPOINT
from .state import NonFiniteError


def to_cpu(obj):
    """A deep copy of ``obj`` with every tensor cloned to host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def scale_step_size(opt, scheduler, factor: float) -> list[float]:
    """Multiply the optimiser's step sizes (and the scheduler's base values, which it recomputes them from)
    by ``factor``; returns the new step sizes."""
    groups = opt.param_groups
    for g in groups:
        g["lr"] *= factor
    if scheduler is not None:
        scheduler.base_lrs = [b * factor for b in scheduler.base_lrs]
    return [g["lr"] for g in groups]


class Recovery:
    """Keeps the trainer's last good state (on the host) and rolls back to it when training diverges.

    ``retries`` rollbacks are allowed until the run gets past the step where it last diverged plus one check
    interval; each one multiplies the step size by ``factor``. After the last, ``rollback`` returns None and
    the caller stops with its error.
    """

    def __init__(self, trainer, factor: float = 0.5, retries: int = 3) -> None:
        self.trainer, self.factor, self.retries = trainer, factor, retries
        self.left = retries
        self.good: dict | None = None
        self.failed_at = -1

    def start(self) -> None:
        """At the start of a run: the parameters' scale to compare with, and the first good state."""
        self.pmax0, self.warned = float(self.trainer.flat.params.abs().max()), 0.0
        self.snapshot()

    def check(self, means: dict[str, float], pmax: float) -> dict | None:
        """None when the interval's means and the largest |parameter| are finite; else a rollback's record (with
        a one-line ``message``), or NonFiniteError when no retry is left."""
        bad = [k for k, v in means.items() if not math.isfinite(v)] + ([] if math.isfinite(pmax) else ["parameters"])
        if not bad:
            return None
        tr = self.trainer
        what = f"non-finite {', '.join(bad)} by step {tr.step}"
        event = self.rollback()
        if event is None:
            raise NonFiniteError(
                f"{what} ({self.retries} rollbacks allowed); the last good checkpoint (if any) is "
                f"{tr.out / CHECKPOINT}. Lower the step size h or raise reg (rerun with --allow-change to keep "
                "this run folder)."
            )
        message = f"{what}: rolled back to step {tr.step}, h now {event['h']} ({event['retries_left']} retries left)"
        return {**event, "message": message}

    def growth(self, pmax: float) -> dict | None:
        """A warning row when the largest |parameter| has grown 1000x past its start (again 10x past the last
        warning): a run too large a step size drives away without ever becoming non-finite."""
        if not (pmax > 1e3 * max(self.pmax0, 1e-12) and pmax > 10 * self.warned):
            return None
        self.warned = pmax
        step = self.trainer.step
        return {
            "step": step,
            "event": "param_growth",
            "max_abs": pmax,
            "initial_max_abs": self.pmax0,
            "message": f"warning: max |parameter| {pmax:.3g} at step {step} (was {self.pmax0:.3g}): h may be too large",
        }

    def snapshot(self) -> None:
        """Remember the trainer's state as good (called after a passed check)."""
        if self.retries == 0:
            return  # nothing will roll back: skip the copy
        self.good = to_cpu(self.trainer.local_state())
        if self.good["step"] > self.failed_at:
            self.left = self.retries  # got past the trouble: a later divergence gets a fresh budget

    def rollback(self) -> dict | None:
        """Restore the last good state with a smaller step size; the event's record, or None when no retry is
        left (or nothing good was seen yet)."""
        tr = self.trainer
        if self.good is None or self.left == 0:
            return None
        failed = tr.step
        self.failed_at = max(self.failed_at, failed)
        self.left -= 1
        tr.restore_local_state(to_cpu(self.good))
        h = scale_step_size(tr.opt, tr.scheduler, self.factor)
        self.good["opt"] = to_cpu(tr.opt.state_dict())  # a second rollback keeps the smaller step size
        if tr.scheduler is not None:
            self.good["scheduler"] = to_cpu(tr.scheduler.state_dict())
        return {"step": failed, "event": "diverged", "rolled_back_to": tr.step, "h": h, "retries_left": self.left}
