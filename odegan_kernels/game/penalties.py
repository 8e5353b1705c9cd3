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
