"""MLPs for the toy problems (the 16-Gaussian colab: two hidden layers of 25 ReLU units)."""

from __future__ import annotations

import torch
from torch import nn

from ..game.losses import Squeeze
from .init import truncated_normal_init_

__all__ = ["MLP", "Squeeze", "mog_pair"]


class MLP(nn.Sequential):
    def __init__(
        self, in_dim: int, out_dim: int, hidden: int = 25, depth: int = 2, dtype: torch.dtype | None = None
    ) -> None:
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden, dtype=dtype), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, out_dim, dtype=dtype))
        super().__init__(*layers)


def mog_pair(z_dim: int = 32, hidden: int = 25, data_dim: int = 2, seed: int = 0, dtype: torch.dtype | None = None):
    """(D, G) for the mixture of Gaussians, initialised as the references do, deterministically. ``dtype``: the
    parameters' dtype (None: torch's default), made and initialised in it (a float64 pair made so is not a cast
    float32 one: its start point carries no float32 rounding)."""
    gen = torch.Generator().manual_seed(seed)
    D = nn.Sequential(MLP(data_dim, 1, hidden, dtype=dtype), Squeeze())
    G = MLP(z_dim, data_dim, hidden, dtype=dtype)
    truncated_normal_init_(D, gen)
    truncated_normal_init_(G, gen)
    return D, G
