"""The penalties' definitions: each one's value, differentiable w.r.t. the parameters of the players it regularises
(contract.PENALTIES says which). Every squared norm goes through the fused ``ops.sqnorm``, differentiable twice.

* ``g_reg`` (ODE-GAN): ||dl_G/dphi||^2 (squared L2 over G's gradient tensors, no 1/2), regularising D; its
  gradient by each of three methods is game/g_reg.py's;
* ``r1`` / ``r2`` (Mescheder et al. 2018): 1/2 E||grad_x D(x)||^2 on real / on generated samples, so that
  weight gamma gives gamma/2 E||.||^2; regularising D;
* ``wgan_gp`` (Gulrajani et al. 2017): E(||grad_x D(x^)|| - 1)^2 on x^ = u x_real + (1 - u) x_fake,
  u ~ U[0, 1] per sample; regularising D;
* ``consensus`` (Mescheder et al. 2017): 1/2 ||v||^2 of the whole field v = [dl_D/dtheta, dl_G/dphi],
  regularising both players.

r1, r2 and wgan_gp also come by a central difference (``input_penalty_fd``, gp_method="finite_difference"): each
one's gradient w.r.t. D's parameters is the directional derivative grad_theta [grad_x D(x) . d] along a direction d
fixed from grad_x D (R1/R2: d = g / B; WGAN-GP: d = 2 (|g| - 1) g / (|g| B) per sample), so with u = d / |d|
grad_theta P ~= |d| grad_theta [sum D(x + eps u) - sum D(x - eps u)] / (2 eps): first-order passes only (two more
forwards of D, one backward), which torch.compile can take. eps = cbrt(machine eps) * max(1, rms(x)), as g_reg's
finite difference (game/g_reg.py); exact up to rounding for a piecewise-linear (ReLU) D while no sample crosses an
activation switch within eps. Measured against the double backward: 1e-10 to 3e-10 relative in float64 on the toy
and a DCGAN pair; 1-20x the gradient's norm in float32, which is therefore refused.

The input-gradient penalties take grad_x of D's summed outputs, which is each sample's own gradient as long as D
treats samples independently (no batch norm in D: true of every D in this package). r1, r2, wgan_gp and consensus
are part of the players' losses, so an ODE stepper evaluates them at every stage point; g_reg once per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops


def generator_grad_sqnorm(loss_g: torch.Tensor, g_params: Sequence[torch.Tensor], backend: str = "auto"):
    """g_reg's value: (||dl_G/dphi||^2 as a scalar differentiable w.r.t. D, the gradients dl_G/dphi detached)."""
    g_phi = torch.autograd.grad(loss_g, list(g_params), create_graph=True)
    return ops.sqnorm(g_phi, backend=backend), [g.detach() for g in g_phi]


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


FD_PENALTIES = ("r1", "r2", "wgan_gp")  # the penalties gp_method="finite_difference" computes without create_graph


def input_penalty_fd(D, out: torch.Tensor, x: torch.Tensor, cond=(), kind: str = "r1", backend: str = "auto"):
    """(value, gradient w.r.t. D's trainable parameters) of R1/R2 (``kind`` "r1", ``x`` real or generated) or of
    WGAN-GP (``kind`` "wgan_gp", ``x`` the interpolates) from D's outputs ``out`` on ``x``, by the central difference
    along the input gradient the module docstring derives; ``cond``: D's class labels. First-order passes only."""
    from .g_reg import fd_epsilon

    if x.dtype != torch.float64:
        raise ValueError(
            f"gp_method='finite_difference' needs float64 inputs and parameters, got {x.dtype}: in float32 a ReLU or "
            "LeakyReLU D's difference is dominated by rounding and activation switches (measured 1-20x the gradient's "
            "norm on the toy and DCGAN pairs); use float64, or gp_method='double_backward'"
        )
    (g,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    g, n = _wide(g).detach(), x.shape[0]
    tiny = torch.finfo(g.dtype).tiny
    if kind == "wgan_gp":
        norms = torch.linalg.vector_norm(g.flatten(1), dim=1)
        value = ops.sqnorm([norms - 1], backend=backend) / n
        d = g * ((norms - 1) * (2 / n) / norms.clamp_min(tiny)).reshape(-1, *([1] * (g.dim() - 1)))
    elif kind == "r1":
        value, d = ops.sqnorm([g], backend=backend) * (0.5 / n), g / n
    else:
        raise ValueError(f"kind must be 'r1' (R1 or R2, by its inputs) or 'wgan_gp', got {kind!r}")
    norm = ops.sqnorm([d], backend=backend).sqrt()
    x0 = x.detach()
    eps = fd_epsilon([x0], backend)
    step = d * (eps / norm.clamp_min(tiny))  # eps u
    params = [p for p in D.parameters() if p.requires_grad]
    diff = D(x0 + step, *cond).sum() - D(x0 - step, *cond).sum()
    grads = torch.autograd.grad(diff, params, allow_unused=True, materialize_grads=True)
    scale = norm / (2 * eps)
    return value.detach(), [gr * scale for gr in grads]
