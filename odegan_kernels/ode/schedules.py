"""Step-size schedules: a multiplier of the step size h as a function of the step count."""

from __future__ import annotations

from collections.abc import Callable


def constant(step: int) -> float:
    return 1.0


def cifar_schedule(step: int, warmup: int = 500, decay_after: int = 400_000) -> float:
    """The CIFAR-10 reference's step-size multiplier: 1/4 for the first 500 steps, 1/2 after 400k."""
    if step < warmup:
        return 0.25
    if step >= decay_after:
        return 0.5
    return 1.0


SCHEDULES: dict[str, Callable[[int], float]] = {"constant": constant, "cifar": cifar_schedule}
