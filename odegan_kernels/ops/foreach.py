"""torch._foreach_* implementations: the fast CPU path and the honest GPU baseline.

Per-segment scalars stay 0-dim device tensors (foreach broadcasts them), so nothing reads back to the host.
"""

from __future__ import annotations

import torch

from .utils import ema_weights, reg_slices, sqnorm_backward


def stage(params, grads, x0, acc, coeffs, segments, reg_grad=None, write_x0=False):
    ks, accs, xs, x0s = [], [], [], []
    for lo, hi in segments:
        ks.append(grads[lo:hi])
        accs.append(acc[lo:hi])
        xs.append(params[lo:hi])
        x0s.append(x0[lo:hi])
    cols = [list(col.unbind(0)) for col in coeffs.unbind(1)]
    a, b, c, d, e = cols
    if reg_grad is not None:
        ks = list(ks)
        for s, (lo, hi) in enumerate(segments):
            r, m = reg_slices(reg_grad, lo, hi)
            if r is not None:
                k = ks[s].clone()
                k[:m].add_(r * e[s])
                ks[s] = k
    # acc = a*acc + b*k, with acc unread where a == 0
    for s in range(len(segments)):
        accs[s].masked_fill_(a[s] == 0, 0.0)
    torch._foreach_mul_(accs, a)
    torch._foreach_addcmul_(accs, ks, b)
    # p = x0 + c*k + d*acc
    torch._foreach_copy_(xs, x0s)
    torch._foreach_addcmul_(xs, ks, c)
    torch._foreach_addcmul_(xs, accs, d)
    if write_x0:
        torch._foreach_copy_(x0s, xs)


def ema_update(avg, params, decay):
    """Two foreach passes, avg *= d then avg += (1 - d)*params; a tensor decay stays on the device."""
    if isinstance(decay, torch.Tensor):
        torch._foreach_mul_([avg], decay)
        torch._foreach_addcmul_([avg], [params], [1 - decay])
    else:
        d, w = ema_weights(decay, avg.dtype)
        torch._foreach_mul_([avg], d)
        torch._foreach_add_([avg], [params], alpha=w)


class _SqNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *tensors):
        ctx.save_for_backward(*tensors)
        # CPU norm kernels accumulate serially (2e-5 relative error at 1M elements): accumulate in
        # float64 there; GPU reductions are tree-shaped and accurate in the input dtype.
        acc = torch.float64 if tensors[0].device.type == "cpu" else None
        norms = torch._foreach_norm(tensors, dtype=acc) if acc else torch._foreach_norm(tensors)
        return torch.stack(norms).square().sum().to(tensors[0].dtype)

    @staticmethod
    def backward(ctx, grad_out):
        return sqnorm_backward(ctx.saved_tensors, grad_out)


def sqnorm(tensors):
    return _SqNorm.apply(*tensors)
