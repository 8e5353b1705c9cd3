"""GAN losses (per player, from D's logits) and the closure that fills the players' gradients.

The velocity field is v = -[dl_D/dtheta, dl_G/dphi]; a closure built here accumulates exactly those
gradients into .grad (FlatParams' views) at the current parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .penalty import generator_grad_sqnorm

LOSSES = ("ns", "minimax", "hinge", "wasserstein")
ZERO_SUM = ("minimax", "wasserstein")  # l_G = -l_D as a function of phi


def _check(kind: str) -> None:
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "ns") -> torch.Tensor:
    """Discriminator loss (batch mean). ns/minimax: cross-entropy with one logit."""
    _check(kind)
    if kind in ("ns", "minimax"):
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return fake_logits.mean() - real_logits.mean()


def g_loss(fake_logits: torch.Tensor, kind: str = "ns") -> torch.Tensor:
    """Generator loss (batch mean). ns: -log D(G(z)); minimax: log(1 - D(G(z)))."""
    _check(kind)
    if kind == "ns":
        return F.softplus(-fake_logits).mean()
    if kind == "minimax":
        return -F.softplus(fake_logits).mean()
    return -fake_logits.mean()


def game_gradients(D: nn.Module, G: nn.Module, real: torch.Tensor, z: torch.Tensor, loss: str = "ns",
                   players: Sequence[int] = (0, 1), penalty: bool = False,
                   g_params: Sequence[torch.Tensor] | None = None, fake: torch.Tensor | None = None) -> dict:
    """Accumulate dl_D/dtheta (player 0) and dl_G/dphi (player 1) into .grad.

    One forward of D on the fakes is shared by both losses; two restricted backward passes. With
    ``penalty``, dl_G/dphi is taken with create_graph and the returned dict carries
    ``penalty = ||dl_G/dphi||^2``, differentiable w.r.t. D's parameters. ``fake`` (D-only calls) reuses
    generator samples already drawn at the current G, skipping G's forward; the dict's ``fake`` holds
    the samples used, detached.
    """
    need_d, need_g = 0 in players, 1 in players
    if penalty and not need_g:
        raise ValueError("the penalty needs the generator's gradient (players must include 1)")
    if fake is not None and need_g:
        raise ValueError("fake= can only be reused when the generator's gradient is not needed")
    if fake is None:
        fake = G(z) if need_g else _no_grad_forward(G, z)
    out: dict = {"fake": fake.detach()}
    d_fake = D(fake if need_g else fake.detach())
    lg = g_loss(d_fake, loss) if need_g else None
    if need_d:
        ld = d_loss(D(real), d_fake, loss)
        d_par = [p for p in D.parameters() if p.requires_grad]
        torch.autograd.backward(ld, inputs=d_par, retain_graph=need_g)
        out["loss_d"] = ld.detach()
    if need_g:
        gp = list(g_params) if g_params is not None else [p for p in G.parameters() if p.requires_grad]
        if penalty:
            pen, g_phi = generator_grad_sqnorm(lg, gp)
            torch._foreach_add_([p.grad for p in gp], g_phi)
            out["penalty"] = pen
        else:
            torch.autograd.backward(lg, inputs=gp)
        out["loss_g"] = lg.detach()
    return out


def _no_grad_forward(G: nn.Module, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return G(z)
