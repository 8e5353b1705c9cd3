"""The players' gradients through autograd: the definition every other gradient engine is tested against.

The velocity field is v = -[dl_D/dtheta, dl_G/dphi]; an evaluation accumulates exactly those gradients into .grad
(FlatParams' views) at the current parameters, and returns the penalties asked for as terms (contract.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .. import ops
from ..contract import PenaltyTerm, StageResult
from .batch import Batch, checked_players, penalty_names
from .g_reg import METHODS, g_reg_grad
from .losses import ZERO_SUM, d_loss, g_loss, get_loss
from .penalties import consensus_penalty, generator_grad_sqnorm, input_grad_penalty, interpolates, wgan_gp_penalty

# measured by python/fd_switch_rate.py (float64, fresh pairs and z): docs/RESULTS.md, "Penalty variants"
FD_HAZARD = (
    "reg_method='finite_difference' differences D's gradient across a step in G's parameters: with ReLU/LeakyReLU "
    "pairs (every pair of this package) 4-7% of evaluations cross an activation switch and err by up to ~1e3x the "
    "gradient, unflagged (python/fd_switch_rate.py); use reg_method='double_backward' or 'jvp' for runs you keep"
)


class AutogradEngine:
    """The game's gradients through autograd for any pair of nn.Modules.

    One forward of D on the fakes is shared by both losses; two restricted backward passes, or one when the loss
    is zero-sum (l_G = -l_D in phi: minimax, wasserstein), whose phi part is then negated (``zero_sum=None`` picks
    it automatically). g_reg comes as its value ||dl_G/dphi||^2, differentiable w.r.t. D, with
    ``reg_method="double_backward"``, otherwise as its gradient (game/g_reg.py's methods) with its value logged.
    ``autocast`` runs forward and backward in bfloat16 (parameters, gradients and stage math stay fp32).
    ``g_params`` (optional) restricts G's trainable parameters. WGAN-GP's interpolation weights come from the
    batch, else are drawn from ``generator`` (None: the device's default generator, as graph capture needs).
    """

    name = "autograd"

    def __init__(
        self,
        D: nn.Module,
        G: nn.Module,
        loss: str = "ns",
        reg_method: str = "double_backward",
        autocast: bool = False,
        g_params: Sequence[torch.Tensor] | None = None,
        zero_sum: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        get_loss(loss)  # a ValueError naming the losses
        if reg_method not in METHODS:
            raise ValueError(f"reg_method (how g_reg is computed) must be one of {METHODS}, got {reg_method!r}")
        if zero_sum and loss not in ZERO_SUM:
            raise ValueError(f"zero_sum=True needs a zero-sum loss {ZERO_SUM}, not {loss!r}")
        if reg_method == "finite_difference":
            warnings.warn(FD_HAZARD, stacklevel=2)
        self.D, self.G, self.loss, self.reg_method = D, G, loss, reg_method
        self.autocast, self.g_params, self.zero_sum, self.generator = autocast, g_params, zero_sum, generator

    def __call__(
        self, batch: Batch, players: Sequence[int] = (0, 1), penalties: Iterable[str] = (), losses: bool = True
    ) -> StageResult:
        """Accumulate dl_D/dtheta (player 0) and dl_G/dphi (player 1) into .grad; return the losses, a term per
        penalty named in ``penalties`` (consensus computes both players' gradients even when ``players`` asks for
        one; only those asked for are accumulated) and the generator samples used (``fake``). ``losses`` is
        ignored: autograd needs the loss values anyway."""
        D, G, loss, method = self.D, self.G, self.loss, self.reg_method
        if not isinstance(batch, Batch):
            raise TypeError(f"the engine takes a game.Batch, got {type(batch).__name__}")
        players, pens = checked_players(players), penalty_names(penalties)
        c_real = () if batch.y_real is None else (batch.y_real,)
        c_fake = () if batch.y_fake is None else (batch.y_fake,)
        noise_r, noise_f = batch.noise if batch.noise is not None else (None, None)
        need_d, need_g = 0 in players, 1 in players
        greg, consensus = "g_reg" in pens, "consensus" in pens
        run_d, run_g = need_d or consensus, need_g or consensus  # the losses computed (consensus needs both)
        if greg and not need_g:
            raise ValueError("g_reg needs the generator's gradient (players must include 1)")
        if not need_d and any(p in pens for p in ("r1", "r2", "wgan_gp")):
            raise ValueError(f"penalties {pens} regularise D: players must include 0")
        fake = batch.fake
        if fake is not None and run_g:
            raise ValueError(
                "batch.fake can only be reused when the generator's gradient is not needed (nor consensus)"
            )
        zero_sum = self.zero_sum
        if zero_sum is None:
            zero_sum = loss in ZERO_SUM and need_d and need_g and not pens
        elif zero_sum and pens:
            raise ValueError("zero_sum=True cannot carry the penalties (they need each loss's own graph)")
        real = batch.real
        amp = torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=self.autocast)
        terms: dict[str, PenaltyTerm] = {}
        with amp:
            if fake is None:
                fake = G(batch.z, *c_fake) if run_g else _no_grad_forward(G, batch.z, *c_fake)
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
                terms["r1"] = PenaltyTerm((0,), input_grad_penalty(d_real, x_real))
            if "r2" in pens:
                terms["r2"] = PenaltyTerm((0,), input_grad_penalty(d_fake, x_fake))
            if "wgan_gp" in pens:
                mix = batch.mix
                if mix is None:
                    mix = torch.rand(real.shape[0], generator=self.generator, device=real.device, dtype=real.dtype)
                x_hat = interpolates(x_real, x_fake, mix)
                terms["wgan_gp"] = PenaltyTerm((0,), wgan_gp_penalty(D(x_hat, *c_real), x_hat))
        out = StageResult(fake=fake.detach(), terms=terms)
        d_par = [p for p in D.parameters() if p.requires_grad]
        gp = []
        if run_g:
            gp = list(self.g_params) if self.g_params is not None else [p for p in G.parameters() if p.requires_grad]
        keep = bool(pens)  # the penalties' values are differentiated later, through this graph

        def reg_term(g_phi) -> PenaltyTerm:  # g_reg, its value and (by an approximate method) its gradient
            with amp:
                grad = g_reg_grad(
                    D, G, lambda logits: g_loss(logits, loss), batch.z, method, g_phi=g_phi, y=batch.y_fake
                )
            return PenaltyTerm((0,), ops.sqnorm([g.detach() for g in g_phi]), grad)

        if consensus:
            g_theta = torch.autograd.grad(ld, d_par, create_graph=True)
            g_phi = torch.autograd.grad(lg, gp, create_graph=True)
            with amp:
                terms["consensus"] = PenaltyTerm((0, 1), consensus_penalty([*g_theta, *g_phi]))
            if need_d:
                _accumulate(d_par, g_theta)
            if need_g:
                _accumulate(gp, g_phi)
            if greg and method == "double_backward":
                terms["g_reg"] = PenaltyTerm((0,), ops.sqnorm(g_phi))
            elif greg:
                terms["g_reg"] = reg_term(g_phi)
        elif zero_sum and need_d and need_g:
            torch.autograd.backward(ld, inputs=d_par + gp)
            torch._foreach_neg_([p.grad for p in gp])
        else:
            if need_d:
                torch.autograd.backward(ld, inputs=d_par, retain_graph=need_g or keep)
            if need_g:
                if greg and method == "double_backward":
                    with amp:
                        pen, g_phi = generator_grad_sqnorm(lg, gp)
                    _accumulate(gp, g_phi)
                    terms["g_reg"] = PenaltyTerm((0,), pen)
                elif greg:
                    g_phi = torch.autograd.grad(lg, gp, retain_graph=keep)
                    _accumulate(gp, g_phi)
                    terms["g_reg"] = reg_term(g_phi)
                else:
                    torch.autograd.backward(lg, inputs=gp, retain_graph=keep)
        if need_d:
            out.loss_d = ld.detach().float()
        if need_g:
            out.loss_g = lg.detach().float()
        return out


def _accumulate(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """.grad += grads, detached (a .grad that is None is created): one foreach add where every .grad exists."""
    if all(p.grad is not None for p in params):
        torch._foreach_add_([p.grad for p in params], [g.detach() for g in grads])
        return
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad.add_(g.detach())


def _no_grad_forward(G: nn.Module, z: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return G(z, *cond)
