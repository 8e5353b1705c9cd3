"""GAN losses per player, as functions of D's logits (batch means), and their derivatives in the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def d_loss_terms(kind: str, real: torch.Tensor, fake: torch.Tensor, value: bool = True):
    """(l_D or None, dl_D/d real logits, dl_D/d fake logits): losses.d_loss and its derivative."""
    nr, nf = real.numel(), fake.numel()
    ld = d_loss(real, fake, kind) if value else None
    if kind in ("ns", "minimax"):
        return ld, torch.sigmoid(-real).mul_(-1.0 / nr), torch.sigmoid(fake).mul_(1.0 / nf)
    if kind == "hinge":
        return ld, (real < 1).to(real.dtype).mul_(-1.0 / nr), (fake > -1).to(fake.dtype).mul_(1.0 / nf)
    return ld, torch.full_like(real, -1.0 / nr), torch.full_like(fake, 1.0 / nf)  # wasserstein


def g_loss_terms(kind: str, fake: torch.Tensor, curvature: bool, value: bool = True):
    """(l_G or None, dl_G/d fake logits, d^2 l_G/d fake logits^2 as a vector or None): losses.g_loss and
    its first two derivatives (the second is diagonal: each sample's loss depends on its own logit only)."""
    n = fake.numel()
    lg = g_loss(fake, kind) if value else None
    if kind in ("ns", "minimax"):
        s = torch.sigmoid(-fake if kind == "ns" else fake)
        curv = (1 - s).mul_(s).mul_(1.0 / n if kind == "ns" else -1.0 / n) if curvature else None
        return lg, s.mul_(-1.0 / n), curv
    # hinge and wasserstein: l_G = -mean(logits), linear
    return lg, torch.full_like(fake, -1.0 / n), (torch.zeros_like(fake) if curvature else None)
