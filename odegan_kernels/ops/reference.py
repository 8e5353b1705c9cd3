"""Plain per-tensor PyTorch: the specification every backend of every fused op is tested against."""

from __future__ import annotations

import torch

from .utils import reg_slices


def stage(params, grads, x0, acc, coeffs, segments, reg_grad=None, write_x0=False):
    """One low-storage Runge-Kutta stage over flat buffers, segment by segment.

    k   = g + e*r            (r = reg_grad covers a prefix of the buffer; beyond its length r = 0)
    acc = a*acc + b*k        (acc is not read where a == 0, as BLAS treats beta == 0)
    p   = x0 + c*k + d*acc
    x0  = p                  (only when write_x0)
    """
    for s, (lo, hi) in enumerate(segments):
        a, b, c, d, e = coeffs[s]
        k = grads[lo:hi].clone()
        r, m = reg_slices(reg_grad, lo, hi)
        if r is not None:
            k[:m] = k[:m] + e * r
        old = torch.where(a == 0, torch.zeros_like(k), a * acc[lo:hi])
        new_acc = old + b * k
        p = x0[lo:hi] + c * k + d * new_acc
        acc[lo:hi] = new_acc
        params[lo:hi] = p
        if write_x0:
            x0[lo:hi] = p


def ema_update(avg, params, decay):
    """avg <- decay*avg + (1-decay)*params over flat buffers, in the buffers' dtype: decay (a float, or a 0-dim
    tensor on their device) is taken in that dtype and 1 - decay computed there."""
    d = torch.as_tensor(decay, dtype=avg.dtype, device=avg.device)
    avg.copy_(d * avg + (1 - d) * params)


def sqnorm(tensors):
    """Sum of squared L2 norms over a list of tensors; autograd differentiates it to any order."""
    total = None
    for t in tensors:
        s = (t * t).sum()
        total = s if total is None else total + s
    return total
