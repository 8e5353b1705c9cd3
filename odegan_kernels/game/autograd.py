"""GAN losses (per player, from D's logits) and the closure that fills the players' gradients.

The velocity field is v = -[dl_D/dtheta, dl_G/dphi]; a closure built here accumulates exactly those
gradients into .grad (FlatParams' views) at the current parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import ops
from .contract import PenaltyTerm, StageResult
from .losses import ZERO_SUM, d_loss, g_loss
from .mlp import pair_for
from .penalty import generator_grad_sqnorm, penalty_grad
from .regularisers import FIELD_PENALTIES, consensus_penalty, input_grad_penalty, interpolates, wgan_gp_penalty

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
    penalties: Sequence[str] = (),
    mix: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    instance_noise: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
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

    ``penalties``: the field's other gradient penalties to return as ``result.terms`` (names in
    regularisers.FIELD_PENALTIES; ``Stage.penalties`` says which). R1 and R2 reuse D's forward on the real and
    the generated batch; WGAN-GP's interpolation weights are ``mix`` (one per sample), else drawn from
    ``generator`` (None: the device's default generator, as graph capture needs); its interpolates carry the
    real batch's labels. Consensus needs both players' gradients, so it computes both even when ``players``
    asks for one (only those asked for are accumulated). ``instance_noise``: (noise added to the real batch,
    noise added to the generated one) as D sees them, either None.

    ``engine``: ``autograd`` (this function's own code, the definition), ``mlp`` (the hand-derived
    gradients of game/mlp.py for a ReLU MLP pair; the penalty then comes as an exact ``penalty_grad``), or
    ``auto`` (``mlp`` wherever ``mlp.unsupported`` finds nothing against it).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    pens = tuple(penalties)
    unknown = [p for p in pens if p not in FIELD_PENALTIES]
    if unknown:
        raise ValueError(f"unknown penalties {unknown}; choose from {tuple(FIELD_PENALTIES)} (g_reg: penalty=True)")
    noise_r, noise_f = instance_noise if instance_noise is not None else (None, None)
    if engine != "autograd":
        pair, why = pair_for(
            D,
            G,
            loss,
            penalty_method,
            autocast=autocast,
            y_real=y_real,
            y_fake=y_fake,
            g_params=g_params,
            penalties=pens,
        )
        if pair is not None:
            return pair(real, z, loss, players, penalty, fake, instance_noise=instance_noise)
        if engine == "mlp":
            raise ValueError(f"engine='mlp' cannot run here: {why}")
    if (y_real is None) != (y_fake is None):
        raise ValueError("a conditional pair needs both y_real and y_fake (or neither, for an unconditional one)")
    c_real = () if y_real is None else (y_real,)
    c_fake = () if y_fake is None else (y_fake,)
    need_d, need_g = 0 in players, 1 in players
    consensus = "consensus" in pens
    run_d, run_g = need_d or consensus, need_g or consensus  # the losses computed (consensus needs both)
    if penalty and not need_g:
        raise ValueError("the penalty needs the generator's gradient (players must include 1)")
    if not need_d and any(p in pens for p in ("r1", "r2", "wgan_gp")):
        raise ValueError(f"penalties {pens} regularise D: players must include 0")
    if fake is not None and run_g:
        raise ValueError("fake= can only be reused when the generator's gradient is not needed (nor consensus)")
    if zero_sum is None:
        zero_sum = loss in ZERO_SUM and need_d and need_g and not penalty and not pens
    elif zero_sum and loss not in ZERO_SUM:
        raise ValueError(f"zero_sum=True needs a zero-sum loss {ZERO_SUM}, not {loss!r}")
    elif zero_sum and pens:
        raise ValueError("zero_sum=True cannot carry the field penalties (they need each loss's own graph)")
    dev_type = real.device.type
    amp = torch.autocast(dev_type, dtype=torch.bfloat16, enabled=autocast)
    terms: list[PenaltyTerm] = []
    with amp:
        if fake is None:
            fake = G(z, *c_fake) if run_g else _no_grad_forward(G, z, *c_fake)
        x_fake = fake if run_g else fake.detach()
        if noise_f is not None:
            x_fake = x_fake + noise_f
        if "r2" in pens and not x_fake.requires_grad:
            x_fake.requires_grad_()
        d_fake = D(x_fake, *c_fake)
        lg = g_loss(d_fake, loss) if run_g else None
        ld = None
        if run_d:
            x_real = real if noise_r is None else real + noise_r
            if "r1" in pens:
                x_real = x_real.detach().requires_grad_()
            d_real = D(x_real, *c_real)
            ld = d_loss(d_real, d_fake, loss)
        if "r1" in pens:
            terms.append(PenaltyTerm("r1", (0,), input_grad_penalty(d_real, x_real)))
        if "r2" in pens:
            terms.append(PenaltyTerm("r2", (0,), input_grad_penalty(d_fake, x_fake)))
        if "wgan_gp" in pens:
            if mix is None:
                mix = torch.rand(real.shape[0], generator=generator, device=real.device, dtype=real.dtype)
            x_hat = interpolates(x_real, x_fake, mix)
            terms.append(PenaltyTerm("wgan_gp", (0,), wgan_gp_penalty(D(x_hat, *c_real), x_hat)))
    out = StageResult(fake=fake.detach(), terms=terms)
    d_par = [p for p in D.parameters() if p.requires_grad]
    gp = (list(g_params) if g_params is not None else [p for p in G.parameters() if p.requires_grad]) if run_g else []
    keep = bool(pens)  # the penalties' values are differentiated later, through this graph
    if consensus:
        g_theta = torch.autograd.grad(ld, d_par, create_graph=True)
        g_phi = torch.autograd.grad(lg, gp, create_graph=True)
        with amp:
            terms.append(PenaltyTerm("consensus", (0, 1), consensus_penalty([*g_theta, *g_phi])))
        if need_d:
            _accumulate(d_par, g_theta)
        if need_g:
            _accumulate(gp, g_phi)
        if penalty and penalty_method == "double_backward":
            out.penalty = ops.sqnorm(g_phi)
        elif penalty:
            out.penalty = ops.sqnorm([g.detach() for g in g_phi])
            with amp:
                out.penalty_grad = penalty_grad(
                    D, G, lambda logits: g_loss(logits, loss), z, penalty_method, g_phi=g_phi, y=y_fake
                )
    elif zero_sum and need_d and need_g:
        torch.autograd.backward(ld, inputs=d_par + gp)
        torch._foreach_neg_([p.grad for p in gp])
    else:
        if need_d:
            torch.autograd.backward(ld, inputs=d_par, retain_graph=need_g or keep)
        if need_g:
            if penalty and penalty_method == "double_backward":
                with amp:
                    pen, g_phi = generator_grad_sqnorm(lg, gp)
                torch._foreach_add_([p.grad for p in gp], g_phi)
                out.penalty = pen
            elif penalty:
                g_phi = torch.autograd.grad(lg, gp, retain_graph=keep)
                torch._foreach_add_([p.grad for p in gp], g_phi)
                with amp:
                    out.penalty_grad = penalty_grad(
                        D, G, lambda logits: g_loss(logits, loss), z, penalty_method, g_phi=g_phi, y=y_fake
                    )
                out.penalty = ops.sqnorm(g_phi)  # the regulariser's value, for the logs
            else:
                torch.autograd.backward(lg, inputs=gp, retain_graph=keep)
    if need_d:
        out.loss_d = ld.detach().float()
    if need_g:
        out.loss_g = lg.detach().float()
    return out


def _accumulate(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """.grad += grads, detached (a .grad that is None is created)."""
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad.add_(g.detach())


def _no_grad_forward(G: nn.Module, z: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return G(z, *cond)
