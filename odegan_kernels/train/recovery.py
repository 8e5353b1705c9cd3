"""Divergence recovery: a copy of the last state that passed the divergence check, and on non-finite values a
rollback to it with a smaller step size, a bounded number of times; warnings when parameters run away.

Recovery knows the run only through what it is given: a function that returns the run's state, one that restores
a state, one that scales the step size, and the path of the last good checkpoint (for its message).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch


class NonFiniteError(RuntimeError):
    """Training reached non-finite values (the message says where, and which checkpoint is the last good one)."""


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
    """Keeps the run's last good state (on the host) and rolls back to it when training diverges.

    ``state()`` returns the run's state (``restore(state)`` puts one back), ``scale_h(factor)`` multiplies the step
    size and returns the new one, ``checkpoint`` is the last good checkpoint's path. ``retries`` rollbacks are allowed
    until the run gets past the step where it last diverged plus one check interval; each one multiplies the step
    size by ``factor``. After the last, ``rollback`` returns None and the caller stops with its error.
    """

    def __init__(
        self,
        state: Callable[[], dict],
        restore: Callable[[dict], None],
        scale_h: Callable[[float], list[float]],
        checkpoint: Path,
        factor: float = 0.5,
        retries: int = 3,
    ) -> None:
        self.state, self.restore, self.scale_h, self.checkpoint = state, restore, scale_h, Path(checkpoint)
        self.factor, self.retries = factor, retries
        self.left = retries
        self.good: tuple[int, dict] | None = None  # (its step, the state)
        self.failed_at = -1
        self.pmax0: float | None = None  # set by start() or a checkpoint
        self.warned = 0.0

    def start(self, step: int, pmax0: float) -> None:
        """At the start of a run: the parameters' scale to compare with (a resumed run keeps its checkpoint's), and
        the first good state."""
        if getattr(self, "pmax0", None) is None:
            self.pmax0, self.warned = pmax0, 0.0
        self.snapshot(step)

    def state_dict(self) -> dict:
        """What a resumed run needs to decide as this one would: the parameters' starting scale, the last warning,
        the rollbacks left and where the run last diverged (the good state itself is the checkpoint's)."""
        return {"pmax0": self.pmax0, "warned": self.warned, "left": self.left, "failed_at": self.failed_at}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore it (a checkpoint written before 0.3 has none: the run then starts its scale afresh)."""
        if state:
            self.pmax0, self.warned = float(state["pmax0"]), float(state["warned"])
            self.left, self.failed_at = int(state["left"]), int(state["failed_at"])

    def check(self, step: int, means: dict[str, float], pmax: float) -> dict | None:
        """None when the interval's means and the largest |parameter| are finite; else a rollback's record (with
        a one-line ``message``), or NonFiniteError when no retry is left."""
        bad = [k for k, v in means.items() if not math.isfinite(v)] + ([] if math.isfinite(pmax) else ["parameters"])
        if not bad:
            return None
        what = f"non-finite {', '.join(bad)} by step {step}"
        event = self.rollback(step)
        if event is None:
            kept = f"the last good checkpoint is {self.checkpoint}" if self.checkpoint.exists() else "no checkpoint"
            raise NonFiniteError(
                f"{what} ({self.retries} rollbacks allowed); {kept}. Lower the step size h or raise reg (rerun with "
                "--allow-change to keep this run folder)."
            )
        back = event["rolled_back_to"]
        message = f"{what}: rolled back to step {back}, h now {event['h']} ({event['retries_left']} retries left)"
        return {**event, "message": message}

    def growth(self, step: int, pmax: float) -> dict | None:
        """A warning row when the largest |parameter| has grown 1000x past its start (again 10x past the last
        warning): a run too large a step size drives away without ever becoming non-finite."""
        if not (pmax > 1e3 * max(self.pmax0, 1e-12) and pmax > 10 * self.warned):
            return None
        self.warned = pmax
        return {
            "step": step,
            "event": "param_growth",
            "max_abs": pmax,
            "initial_max_abs": self.pmax0,
            "message": f"warning: max |parameter| {pmax:.3g} at step {step} (was {self.pmax0:.3g}): h may be too large",
        }

    def snapshot(self, step: int) -> None:
        """Remember the run's state at ``step`` as good (called after a passed check)."""
        if self.retries == 0:
            return  # nothing will roll back: skip the copy
        self.good = (step, to_cpu(self.state()))
        if step > self.failed_at:
            self.left = self.retries  # got past the trouble: a later divergence gets a fresh budget

    def rollback(self, step: int) -> dict | None:
        """Restore the last good state with a smaller step size; the event's record, or None when no retry is
        left (or nothing good was seen yet)."""
        if self.good is None or self.left == 0:
            return None
        self.failed_at = max(self.failed_at, step)
        self.left -= 1
        good_step, state = self.good
        self.restore(to_cpu(state))
        h = self.scale_h(self.factor)
        self.good = (good_step, to_cpu(self.state()))  # a second rollback keeps the smaller step size
        return {"step": step, "event": "diverged", "rolled_back_to": good_step, "h": h, "retries_left": self.left}
