"""GAN losses per player, as functions of D's logits (batch means), each defined once with its derivatives.

A loss is written per sample in the logit: D's loss is mean(r(real logits)) + mean(f(fake logits)) and G's
is mean(g(fake logits)). Each class below gives r, f and g and their derivatives (g's second derivative too:
the hand-derived penalty needs it). ``d_loss`` / ``g_loss`` are what autograd differentiates; the
``*_terms`` functions are what the hand-derived engine (game/mlp.py) uses in its place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Squeeze(nn.Module):
    """D's last module when its last layer has one output: [N, 1] -> [N], the one logit per sample the losses take
    (the hand-derived engine recognises a D that ends in it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.squeeze(-1)


class GANLoss:
    """One loss: per-sample terms of D's loss on real and fake logits and of G's loss on fake logits."""

    zero_sum = False  # l_G = -l_D as a function of G's parameters

    def d_real(self, x):  # D's per-sample loss on a real logit
        raise NotImplementedError

    def d_fake(self, x):  # ... on a fake logit
        raise NotImplementedError

    def g(self, x):  # G's per-sample loss on a fake logit
        raise NotImplementedError

    def d_real_grad(self, x):
        raise NotImplementedError

    def d_fake_grad(self, x):
        raise NotImplementedError

    def g_grads(self, x, curvature: bool):
        """(g'(x), g''(x) or None)."""
        raise NotImplementedError


class NonSaturating(GANLoss):
    """D: cross-entropy with one logit; G: -log D(G(z)) (Goodfellow et al.'s non-saturating loss)."""

    def d_real(self, x):
        return F.softplus(-x)

    def d_fake(self, x):
        return F.softplus(x)

    def g(self, x):
        return F.softplus(-x)

    def d_real_grad(self, x):
        return -torch.sigmoid(-x)

    def d_fake_grad(self, x):
        return torch.sigmoid(x)

    def g_grads(self, x, curvature):
        s = torch.sigmoid(-x)
        return -s, ((1 - s) * s if curvature else None)


class Minimax(NonSaturating):
    """D: cross-entropy; G: log(1 - D(G(z))), the zero-sum game of the original GAN."""

    zero_sum = True

    def g(self, x):
        return -F.softplus(x)

    def g_grads(self, x, curvature):
        s = torch.sigmoid(x)
        return -s, (-(1 - s) * s if curvature else None)


class Hinge(GANLoss):
    """D: relu(1 - real) + relu(1 + fake); G: -D(G(z))."""

    def d_real(self, x):
        return F.relu(1 - x)

    def d_fake(self, x):
        return F.relu(1 + x)

    def g(self, x):
        return -x

    def d_real_grad(self, x):
        return -(x < 1).to(x.dtype)

    def d_fake_grad(self, x):
        return (x > -1).to(x.dtype)

    def g_grads(self, x, curvature):
        return torch.full_like(x, -1.0), (torch.zeros_like(x) if curvature else None)


class Wasserstein(Hinge):
    """D: fake - real (the critic's loss, unconstrained here); G: -D(G(z))."""

    zero_sum = True

    def d_real(self, x):
        return -x

    def d_fake(self, x):
        return x

    def d_real_grad(self, x):
        return torch.full_like(x, -1.0)

    def d_fake_grad(self, x):
        return torch.full_like(x, 1.0)


class LeastSquares(GANLoss):
    """LSGAN (Mao et al. 2017, targets a=0, b=c=1): D: (real - 1)^2 / 2 + fake^2 / 2; G: (D(G(z)) - 1)^2 / 2."""

    def d_real(self, x):
        return 0.5 * (x - 1).square()

    def d_fake(self, x):
        return 0.5 * x.square()

    def g(self, x):
        return 0.5 * (x - 1).square()

    def d_real_grad(self, x):
        return x - 1

    def d_fake_grad(self, x):
        return x.clone()  # the callers scale it in place

    def g_grads(self, x, curvature):
        return x - 1, (torch.ones_like(x) if curvature else None)


LOSSES: dict[str, GANLoss] = {
    "ns": NonSaturating(),
    "minimax": Minimax(),
    "hinge": Hinge(),
    "wasserstein": Wasserstein(),
    "lsgan": LeastSquares(),
}
ZERO_SUM = tuple(k for k, v in LOSSES.items() if v.zero_sum)


def get_loss(kind: str) -> GANLoss:
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {tuple(LOSSES)}")
    return LOSSES[kind]


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "ns") -> torch.Tensor:
    """Discriminator loss (batch mean)."""
    loss = get_loss(kind)
    return loss.d_real(real_logits).mean() + loss.d_fake(fake_logits).mean()


def g_loss(fake_logits: torch.Tensor, kind: str = "ns") -> torch.Tensor:
    """Generator loss (batch mean)."""
    return get_loss(kind).g(fake_logits).mean()


def d_loss_terms(kind: str, real: torch.Tensor, fake: torch.Tensor, value: bool = True):
    """(l_D or None, dl_D/d real logits, dl_D/d fake logits)."""
    loss = get_loss(kind)
    ld = d_loss(real, fake, kind) if value else None
    return ld, loss.d_real_grad(real).mul_(1.0 / real.numel()), loss.d_fake_grad(fake).mul_(1.0 / fake.numel())


def g_loss_terms(kind: str, fake: torch.Tensor, curvature: bool, value: bool = True):
    """(l_G or None, dl_G/d fake logits, d^2 l_G/d fake logits^2 as a vector or None): the second derivative is
    diagonal, each sample's loss depending on its own logit only."""
    n = fake.numel()
    lg = g_loss(fake, kind) if value else None
    grad, curv = get_loss(kind).g_grads(fake, curvature)
    return lg, grad.mul_(1.0 / n), (None if curv is None else curv.mul_(1.0 / n))
