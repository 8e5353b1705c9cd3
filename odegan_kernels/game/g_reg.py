"""g_reg's gradient g_reg = grad_theta ||dl_G/dphi||^2 w.r.t. D's parameters, by each of its three methods (all
exact in the limit; game/penalties.py defines its value):

* ``double_backward`` (the paper's): dl_G/dphi with create_graph, the fused sqnorm, one more backward.
* ``finite_difference``: g_reg = 2 (d^2 l_G / dtheta dphi) g_phi is a directional derivative of
  grad_theta l_G along g_phi; a central difference with unit direction u = g_phi / |g_phi| gives
  g_reg ~= |g_phi| * (grad_theta l_G(phi + eps u) - grad_theta l_G(phi - eps u)) / eps. No double backward,
  so it works where that cannot (torch.compile, graph partitions). eps = cbrt(machine eps of the dtype)
  * max(1, rms(phi)): truncation O(eps^2) balanced against rounding O(machine eps / eps). That rule
  assumes a smooth game. With a ReLU/LeakyReLU discriminator grad_theta l_G jumps wherever D's activation
  pattern switches, so the difference is exact only while eps stays below the nearest switch. Measured on
  the toy MLP pair (64 samples, 16 units): float64 with the rule (eps 6e-6) 1e-9 relative error, but
  eps = 1e-3 gives 3.5; float32 at best 1e-2 (eps 1e-5). Use it in float64, or with smooth networks.
* ``jvp``: the same directional derivative by forward-over-reverse (torch.func.jvp of grad_theta l_G).

The hand-derived engine (game/mlp.py) computes the same quantity exactly, by forward-over-reverse written out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .. import ops
from .penalties import generator_grad_sqnorm

METHODS = ("double_backward", "finite_difference", "jvp")


def fd_epsilon(params: Sequence[torch.Tensor], backend: str = "auto") -> torch.Tensor:
    """cbrt(machine eps) * max(1, rms of the parameters): the central difference's step, as a 0-dim
    tensor on the parameters' device (no host sync, so the step stays capturable)."""
    params = [p.detach() for p in params]
    n = sum(p.numel() for p in params)
    rms = (ops.sqnorm(params, backend=backend) / max(n, 1)).sqrt()
    return float(torch.finfo(params[0].dtype).eps) ** (1 / 3) * rms.clamp_min(1.0)


def _buffers_of(module: nn.Module) -> list[torch.Tensor]:
    return [b for b in module.buffers()]


def g_reg_grad(
    D: nn.Module,
    G: nn.Module,
    loss_g_fn: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    method: str = "double_backward",
    g_phi: Sequence[torch.Tensor] | None = None,
    eps: float | None = None,
    backend: str = "auto",
    y: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """g_reg (one tensor per trainable parameter of D) at the current parameters.

    ``loss_g_fn(fake_logits)`` is the generator's batch-mean loss; ``g_phi`` (optional) is dl_G/dphi
    already computed at this point; ``y`` (optional) the class labels of a conditional pair, passed to
    both G and D. G's buffers (BN running statistics) are left as they were.
    """
    if method not in METHODS:
        raise ValueError(f"reg_method (how g_reg is computed) must be one of {METHODS}, got {method!r}")
    d_par = [p for p in D.parameters() if p.requires_grad]
    g_par = [p for p in G.parameters() if p.requires_grad]
    saved = [b.detach().clone() for b in _buffers_of(G)]
    cond = () if y is None else (y,)

    def fake_loss(phi=None, theta=None) -> torch.Tensor:
        # l_G at the current parameters, or at the given ones (dicts, for torch.func)
        fake = G(z, *cond) if phi is None else functional_call(G, phi, (z, *cond))
        return loss_g_fn(D(fake, *cond) if theta is None else functional_call(D, theta, (fake, *cond)))

    try:
        if method == "double_backward":
            sq, _ = generator_grad_sqnorm(fake_loss(), g_par, backend)
            return list(torch.autograd.grad(sq, d_par, allow_unused=True, materialize_grads=True))
        if g_phi is None:
            g_phi = torch.autograd.grad(fake_loss(), g_par)
        g_phi = [g.detach() for g in g_phi]
        if method == "finite_difference":
            return _finite_difference(fake_loss, d_par, g_par, g_phi, eps, backend)
        return _jvp(D, G, fake_loss, d_par, g_par, g_phi)
    finally:
        with torch.no_grad():
            for b, s in zip(_buffers_of(G), saved):
                b.copy_(s)


def _finite_difference(fake_loss, d_par, g_par, g_phi, eps, backend):
    norm = ops.sqnorm(g_phi, backend=backend).sqrt()
    if eps is None:
        eps = fd_epsilon(g_par, backend)
    direction = [g / norm.clamp_min(torch.finfo(norm.dtype).tiny) for g in g_phi]
    start = [p.detach().clone() for p in g_par]
    grads = []
    try:
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, p0, u in zip(g_par, start, direction):
                    p.copy_(p0 + sign * eps * u)
            grads.append(torch.autograd.grad(fake_loss(), d_par, allow_unused=True, materialize_grads=True))
    finally:
        with torch.no_grad():
            for p, p0 in zip(g_par, start):
                p.copy_(p0)
    return [(gp - gm) * (norm / eps) for gp, gm in zip(*grads)]


def _jvp(D, G, fake_loss, d_par, g_par, g_phi):
    from torch.func import grad, jvp

    for m in G.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            raise ValueError(
                "reg_method='jvp' cannot trace BatchNorm's running-statistic updates in G; use "
                "reg_method='double_backward' or 'finite_difference'"
            )
    d_names = [n for n, p in D.named_parameters() if p.requires_grad]
    g_names = [n for n, p in G.named_parameters() if p.requires_grad]
    d_vals = {n: p.detach() for n, p in zip(d_names, d_par)}

    def grad_theta(phi: dict) -> dict:
        return grad(lambda theta: fake_loss(phi, theta))(d_vals)

    phi = {n: p.detach() for n, p in zip(g_names, g_par)}
    tangent = {n: g for n, g in zip(g_names, g_phi)}
    _, dgrad = jvp(grad_theta, (phi,), (tangent,))
    return [2 * dgrad[n] for n in d_names]
