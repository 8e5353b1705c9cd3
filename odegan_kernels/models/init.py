"""The references' initialisation: truncated normal (at 2 sigma) with sigma = 1/sqrt(fan_in), zero biases."""

import contextlib
import math

import torch
from torch import nn


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside are made (and initialised) in ``dtype``: torch's default dtype, restored after."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@torch.no_grad()
def truncated_normal_init_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            w = m.weight
            if isinstance(m, nn.ConvTranspose2d):
                fan_in = w.shape[0] * w[0, 0].numel()  # in_channels * kernel area
            else:
                fan_in = w[0].numel()
            std = 1.0 / math.sqrt(fan_in)
            nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std, generator=generator)
            if m.bias is not None:
                m.bias.zero_()
    return module
