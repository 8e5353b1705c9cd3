"""Adam and SGD behind the ODE stepper's ``step(closure)`` interface, so the training loop has one path.

One closure call per step (Stage 0, both players); the regulariser, when ``reg > 0``, goes through the same
function as the ODE stepper's (game.penalty.apply_penalty) with weight ``reg``; under torchrun the flat
gradients are averaged once per step.
"""

from __future__ import annotations

import math

import torch

from ..distributed import average_across_ranks
from ..flat import FlatParams
from ..game.contract import Stage, as_result, returned
from ..game.penalty import apply_penalty

OPTIMIZERS = ("adam", "sgd")


class BaselineOptimizer:
    """``torch.optim.Adam`` or ``SGD`` (one param group per player) driven by the stepper's closure contract."""

    def __init__(
        self,
        flat: FlatParams,
        kind: str = "adam",
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        reg: float = 0.0,
        regularised: int | str = 0,
        distributed: bool = False,
        process_group=None,
    ) -> None:
        if kind not in OPTIMIZERS:
            raise ValueError(f"kind must be one of {OPTIMIZERS}, got {kind!r}")
        if not math.isfinite(reg) or reg < 0:
            raise ValueError(f"reg (the regulariser weight lambda) must be >= 0, got {reg}")
        self.flat = flat
        self.reg = float(reg)
        self.regularised = flat.index(regularised)
        self.distributed, self.process_group = distributed, process_group
        self.steps = 0
        groups = [{"params": flat.parameters(i)} for i in range(len(flat.segments))]
        self.optimizer = (
            torch.optim.Adam(groups, lr=lr, betas=betas) if kind == "adam" else torch.optim.SGD(groups, lr=lr)
        )

    def step(self, closure):
        """One gradient evaluation and one optimizer step; returns what the closure returned (detached)."""
        self.flat.zero_grad()
        out = closure(Stage(0, self.steps, tuple(range(len(self.flat.segments))), self.reg > 0))
        if self.reg > 0:
            out = as_result(out)
            value = apply_penalty(out, self.flat.parameters(self.regularised), self.reg)
            if value is not None:
                out.penalty = value
        if self.distributed:
            average_across_ranks(self.flat.grads, self.process_group)
        self.optimizer.step()
        self.steps += 1
        return returned(out)

    def state_dict(self) -> dict:
        return {**self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.steps = int(state.pop("steps", 0))
        self.optimizer.load_state_dict(state)
