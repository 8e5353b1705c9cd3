"""The gradient penalties of the players' field beside g_reg (R1, R2, WGAN-GP, consensus): each one's value,
differentiable w.r.t. the parameters it regularises, and the spec an optimiser holds (name, weight, lazy interval).

They are part of the players' losses, so an ODE stepper evaluates them at every stage point; game/penalty.py's
``apply_penalty`` turns them into gradients. Definitions are in game/penalty.py's module text.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .. import ops

FIELD_PENALTIES: dict[str, tuple[int, ...]] = {"r1": (0,), "r2": (0,), "wgan_gp": (0,), "consensus": (0, 1)}
"""Each penalty of the field and the players it regularises (0 = D, 1 = G)."""


@dataclass(frozen=True)
class Penalty:
    """One gradient penalty of the field with its weight; ``every`` > 1 makes it lazy (StyleGAN2's lazy R1):
    applied only at steps 0, k, 2k, ... and then weighted ``weight * every``, so its mean effect is unchanged."""

    name: str
    weight: float
    every: int = 1

    def __post_init__(self) -> None:
        if self.name == "g_reg":
            raise ValueError("g_reg is the optimisers' own regulariser: give its weight as reg= (and penalty_at=)")
        if self.name not in FIELD_PENALTIES:
            raise ValueError(f"unknown penalty {self.name!r}; choose from {tuple(FIELD_PENALTIES)}")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            raise ValueError(f"the weight of penalty {self.name!r} must be a finite number >= 0, got {w!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, numbers.Integral) or self.every < 1:
            raise ValueError(
                f"penalty {self.name!r}: every (the lazy interval) must be an int >= 1, got {self.every!r}"
            )
        object.__setattr__(self, "weight", float(w))  # numpy and other real scalars as plain numbers
        object.__setattr__(self, "every", int(self.every))
        if not math.isfinite(self.weight * self.every):
            raise ValueError(
                f"penalty {self.name!r}: weight x every (its weight on the steps it applies) overflows: "
                f"{self.weight} x {self.every}"
            )

    @property
    def players(self) -> tuple[int, ...]:
        return FIELD_PENALTIES[self.name]


def penalty_specs(penalties: Mapping | Iterable[Penalty] | None) -> tuple[Penalty, ...]:
    """The field penalties an optimiser applies, from Penalty objects or a mapping {name: weight} or
    {name: (weight, every)}; zero weights are dropped, a name given twice is refused."""
    if penalties is None:
        return ()
    if isinstance(penalties, Mapping):
        specs = []
        for k, v in penalties.items():
            if isinstance(v, (tuple, list)) and len(v) not in (1, 2):
                raise ValueError(f"penalty {k!r}: give a weight or (weight, every), got {v!r}")
            specs.append(Penalty(k, *v) if isinstance(v, (tuple, list)) else Penalty(k, v))
    else:
        specs = list(penalties)
        if any(not isinstance(p, Penalty) for p in specs):
            raise TypeError("penalties must be a mapping {name: weight} or a sequence of Penalty")
    names = [p.name for p in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"a penalty is given twice: {names}")
    return tuple(p for p in specs if p.weight > 0)


def due(specs: Sequence[Penalty], step: int, players: Sequence[int]) -> dict[str, float]:
    """{name: weight x every} of the penalties due at ``step`` that regularise any of ``players``."""
    return {p.name: p.weight * p.every for p in specs if step % p.every == 0 and set(p.players) & set(players)}


def input_grad_penalty(out: torch.Tensor, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """1/2 E||grad_x D(x)||^2 (R1 on real ``x``, R2 on generated ``x``), from D's outputs ``out`` on ``x``;
    differentiable w.r.t. D's parameters (the gradient is taken with create_graph)."""
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return ops.sqnorm([_wide(g)], backend=backend) * (0.5 / x.shape[0])


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in float32 when autocast made it bf16/fp16 (the fakes under autocast): sqnorm reduces fp32/fp64."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def interpolates(real: torch.Tensor, fake: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """x^ = u x_real + (1 - u) x_fake per sample (u = ``mix``, shape (batch,)), detached, requiring grad."""
    u = mix.to(real.dtype).reshape(-1, *([1] * (real.dim() - 1)))
    return (u * real.detach() + (1 - u) * fake.detach()).requires_grad_()


def wgan_gp_penalty(out: torch.Tensor, x_hat: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """E(||grad_x D(x^)|| - 1)^2 from D's outputs ``out`` on the interpolates ``x_hat``. The per-sample norms are
    one row-wise reduction (ops.sqnorm sums whole tensors); their deviations from 1 go through ops.sqnorm."""
    (g,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    norms = torch.linalg.vector_norm(g.flatten(1), dim=1)
    return ops.sqnorm([norms - 1], backend=backend) / x_hat.shape[0]


def consensus_penalty(grads: Sequence[torch.Tensor], backend: str = "auto") -> torch.Tensor:
    """1/2 ||v||^2 from the players' gradients [dl_D/dtheta..., dl_G/dphi...] taken with create_graph."""
    return ops.sqnorm(list(grads), backend=backend) * 0.5
