"""Plain per-tensor PyTorch: the specification every backend of every fused op is tested against."""

from __future__ import annotations

import torch

from .utils import reg_slices


def stage(params, grads, x0, acc, coeffs, segments, reg=None, write_x0=False):
    """One low-storage Runge-Kutta stage over flat buffers, segment by segment.

    k   = g + e*r            (r covers a prefix of the buffer; beyond reg's length r = 0)
    acc = a*acc + b*k        (acc is not read where a == 0, as BLAS treats beta == 0)
    p   = x0 + c*k + d*acc
    x0  = p                  (only when write_x0)
    """
    for s, (lo, hi) in enumerate(segments):
        a, b, c, d, e = coeffs[s]
        k = grads[lo:hi].clone()
        r, m = reg_slices(reg, lo, hi)
        if r is not None:
            k[:m] = k[:m] + e * r
        old = torch.where(a == 0, torch.zeros_like(k), a * acc[lo:hi])
        new_acc = old + b * k
        p = x0[lo:hi] + c * k + d * new_acc
        acc[lo:hi] = new_acc
        params[lo:hi] = p
        if write_x0:
            x0[lo:hi] = p


def sqnorm(tensors):
    """Sum of squared L2 norms over a list of tensors; autograd differentiates it to any order."""
    total = None
    for t in tensors:
        s = (t * t).sum()
        total = s if total is None else total + s
    return total
