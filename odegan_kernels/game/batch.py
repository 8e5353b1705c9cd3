"""A gradient evaluation's inputs (Batch), and the checks every gradient engine makes of what it is asked."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..contract import PENALTIES


@dataclass
class Batch:
    """The inputs of one evaluation of the players' gradients.

    real: a batch of real samples; z: the latents G maps to fakes; y_real / y_fake: a class-conditional pair's
    labels of the real batch and of the samples to generate (both or neither); mix: WGAN-GP's interpolation
    weights, one per sample (None: drawn by the engine); noise: instance noise added to (real, fake) as D sees
    them, either None; fake: samples G drew at its current parameters, reused by an evaluation of D alone.
    """

    real: torch.Tensor
    z: torch.Tensor
    y_real: torch.Tensor | None = None
    y_fake: torch.Tensor | None = None
    mix: torch.Tensor | None = None
    noise: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
    fake: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("real", "z"):
            v = getattr(self, name)
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"Batch.{name} must be a tensor, got {type(v).__name__}")
            if v.dim() == 0 or v.shape[0] == 0:
                raise ValueError(f"Batch.{name} is empty (shape {tuple(v.shape)}): a loss over no samples is NaN")
        for name in ("y_real", "y_fake", "mix", "fake"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, torch.Tensor):
                raise TypeError(f"Batch.{name} must be a tensor or None, got {type(v).__name__}")
        if (self.y_real is None) != (self.y_fake is None):
            raise ValueError("a conditional pair needs both y_real and y_fake (or neither, for an unconditional one)")
        if self.noise is not None and (not isinstance(self.noise, tuple) or len(self.noise) != 2):
            raise TypeError("Batch.noise must be a pair (noise on the real batch, noise on the fakes), either None")

    @property
    def conditional(self) -> bool:
        return self.y_real is not None


def checked_players(players: Sequence[int]) -> tuple[int, ...]:
    """``players`` as a tuple of distinct player indices among 0 (D) and 1 (G), at least one."""
    try:
        out = tuple(players)
    except TypeError:
        raise TypeError(f"players must be a sequence of player indices (0 = D, 1 = G), got {players!r}") from None
    valid = [isinstance(p, int) and not isinstance(p, bool) and p in (0, 1) for p in out]
    if not out or not all(valid) or len(set(out)) != len(out):
        raise ValueError(f"players must name D (0), G (1) or both, each once; got {players!r}")
    return out


def penalty_names(penalties: Iterable[str]) -> tuple[str, ...]:
    """The names of the penalties asked for (a Stage's {name: weight} or a sequence of names), each known."""
    names = tuple(penalties)
    unknown = [p for p in names if p not in PENALTIES]
    if unknown:
        raise ValueError(f"unknown penalties {unknown}; choose from {tuple(PENALTIES)}")
    return names
