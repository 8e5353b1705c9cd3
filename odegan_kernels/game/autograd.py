"""GAN losses (per player, from D's logits) and the closure that fills the players' gradients.

The velocity field is v = -[dl_D/dtheta, dl_G/dphi]; a closure built here accumulates exactly those
gradients into .grad (FlatParams' views) at the current parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import ops
from .contract import StageResult
from .losses import ZERO_SUM, d_loss, g_loss
from .mlp import pair_for
from .penalty import generator_grad_sqnorm, penalty_grad

ENGINES = ("autograd", "mlp", "auto")


def game_gradients(
    D: nn.Module,
    G: nn.Module,
    real: torch.Tensor,
    z: torch.Tensor,
    loss: str = "ns",
    players: Sequence[int] = (0, 1),
    penalty: bool = False,
    g_params: Sequence[torch.Tensor] | None = None,
    fake: torch.Tensor | None = None,
    penalty_method: str = "double_backward",
    zero_sum: bool | None = None,
    autocast: bool = False,
    y_real: torch.Tensor | None = None,
    y_fake: torch.Tensor | None = None,
    engine: str = "autograd",
) -> StageResult:
    """Accumulate dl_D/dtheta (player 0) and dl_G/dphi (player 1) into .grad; return a StageResult
    (game/contract.py) with the losses, the regulariser when ``penalty`` is set, and the samples used.

    One forward of D on the fakes is shared by both losses; two restricted backward passes, or one when
    the loss is zero-sum (l_G = -l_D in phi: minimax, wasserstein), whose phi part is then negated
    (``zero_sum=None`` picks it automatically). With ``penalty`` the result carries the regulariser: with
    ``penalty_method="double_backward"`` as ``penalty = ||dl_G/dphi||^2`` (differentiable w.r.t. D),
    otherwise as ``penalty_grad`` (its gradient per D parameter, penalty.METHODS). ``fake`` (D-only calls)
    reuses generator samples drawn at the current G; the result's ``fake`` holds the samples used.
    ``autocast`` runs forward and backward in bfloat16 (parameters, gradients and stage math stay fp32).
    A class-conditional pair (``G(z, y)``, ``D(x, y)``) gets the real batch's labels ``y_real`` and the
    labels to generate, ``y_fake``; give both or neither.

    ``engine``: ``autograd`` (this function's own code, the definition), ``mlp`` (the hand-derived
    gradients of game/mlp.py for a ReLU MLP pair; the penalty then comes as an exact ``penalty_grad``), or
    ``auto`` (``mlp`` wherever ``mlp.unsupported`` finds nothing against it).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine != "autograd":
        pair, why = pair_for(
            D, G, loss, penalty_method, autocast=autocast, y_real=y_real, y_fake=y_fake, g_params=g_params
        )
        if pair is not None:
            return pair(real, z, loss, players, penalty, fake)
        if engine == "mlp":
            raise ValueError(f"engine='mlp' cannot run here: {why}")
    if (y_real is None) != (y_fake is None):
        raise ValueError("a conditional pair needs both y_real and y_fake (or neither, for an unconditional one)")
    c_real = () if y_real is None else (y_real,)
    c_fake = () if y_fake is None else (y_fake,)
    need_d, need_g = 0 in players, 1 in players
    if penalty and not need_g:
        raise ValueError("the penalty needs the generator's gradient (players must include 1)")
    if fake is not None and need_g:
        raise ValueError("fake= can only be reused when the generator's gradient is not needed")
    if zero_sum is None:
        zero_sum = loss in ZERO_SUM and need_d and need_g and not penalty
    elif zero_sum and loss not in ZERO_SUM:
        raise ValueError(f"zero_sum=True needs a zero-sum loss {ZERO_SUM}, not {loss!r}")
    dev_type = real.device.type
    amp = torch.autocast(dev_type, dtype=torch.bfloat16, enabled=autocast)
    with amp:
        if fake is None:
            fake = G(z, *c_fake) if need_g else _no_grad_forward(G, z, *c_fake)
        d_fake = D(fake if need_g else fake.detach(), *c_fake)
        lg = g_loss(d_fake, loss) if need_g else None
        ld = d_loss(D(real, *c_real), d_fake, loss) if need_d else None
    out = StageResult(fake=fake.detach())
    d_par = [p for p in D.parameters() if p.requires_grad]
    gp = (list(g_params) if g_params is not None else [p for p in G.parameters() if p.requires_grad]) if need_g else []
    if zero_sum and need_d and need_g:
        torch.autograd.backward(ld, inputs=d_par + gp)
        torch._foreach_neg_([p.grad for p in gp])
    else:
        if need_d:
            torch.autograd.backward(ld, inputs=d_par, retain_graph=need_g)
        if need_g:
            if penalty and penalty_method == "double_backward":
                with amp:
                    pen, g_phi = generator_grad_sqnorm(lg, gp)
                torch._foreach_add_([p.grad for p in gp], g_phi)
                out.penalty = pen
            elif penalty:
                g_phi = torch.autograd.grad(lg, gp)
                torch._foreach_add_([p.grad for p in gp], g_phi)
                with amp:
                    out.penalty_grad = penalty_grad(
                        D, G, lambda logits: g_loss(logits, loss), z, penalty_method, g_phi=g_phi, y=y_fake
                    )
                out.penalty = ops.sqnorm(g_phi)  # the regulariser's value, for the logs
            else:
                torch.autograd.backward(lg, inputs=gp)
    if need_d:
        out.loss_d = ld.detach().float()
    if need_g:
        out.loss_g = lg.detach().float()
    return out


def _no_grad_forward(G: nn.Module, z: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return G(z, *cond)
