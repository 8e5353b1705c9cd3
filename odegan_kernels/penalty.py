"""The gradient-norm regulariser of ODE-GAN: g_reg = grad_theta ||dl_G/dphi||^2 (squared L2, no 1/2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import ops


def generator_grad_sqnorm(loss_g: torch.Tensor, g_params: Sequence[torch.Tensor], backend: str = "auto"):
    """(||dl_G/dphi||^2 as a scalar differentiable w.r.t. D, the gradients dl_G/dphi detached)."""
    g_phi = torch.autograd.grad(loss_g, list(g_params), create_graph=True)
    return ops.sqnorm(g_phi, backend=backend), [g.detach() for g in g_phi]


def regulariser_grad(loss_g: torch.Tensor, d_params: Sequence[torch.Tensor], g_params: Sequence[torch.Tensor],
                     out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """g_reg = grad_theta ||dl_G/dphi||^2 by double backward, written into a flat buffer (returned).

    ``out`` (optional) is a flat buffer with at least as many elements as D's parameters; tensors
    are laid out back to back in ``d_params`` order.
    """
    d_params = list(d_params)
    n = sum(p.numel() for p in d_params)
    if out is None:
        out = torch.empty(n, dtype=d_params[0].dtype, device=d_params[0].device)
    elif out.dim() != 1 or out.numel() < n:
        raise ValueError(f"out must be a flat buffer of at least {n} elements, got shape {tuple(out.shape)}")
    sq, _ = generator_grad_sqnorm(loss_g, g_params, backend=backend)
    grads = torch.autograd.grad(sq, d_params, allow_unused=True)
    off = 0
    for p, g in zip(d_params, grads):
        view = out[off:off + p.numel()]
        if g is None:
            view.zero_()
        else:
            view.copy_(g.reshape(-1))
        off += p.numel()
    return out
