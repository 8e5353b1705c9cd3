"""The players' gradients for a pair of plain ReLU MLPs (the toy problems' players), derived by hand.

Eager autograd spends most of a toy step on per-op bookkeeping (docs/RESULTS.md measures it). Here the
same quantities come from a few large ops: each layer's forward is
one ``addmm`` and one in-place ReLU, its backward one ``addmm_`` straight into ``.grad``, one bias sum
and one masked product; D sees the real and the fake batch as one matrix.

The regulariser's gradient g_reg = grad_theta ||dl_G/dphi||^2 = 2 (d^2 l_G / dtheta dphi) g_phi is taken
exactly, by forward-over-reverse written out: push the tangent g_phi through G's forward and D's
forward, then through D's backward (ReLU masks are constant a.e., so they carry the tangent unchanged).
It is what g_reg.py's ``jvp`` and ``double_backward`` methods compute, reached in a different order.

The autograd engine (game/autograd.py) defines every quantity here; tests/test_mlp_engine.py compares the two
in float64 for every loss, player set and penalty, and game/engine.py's ``choose_engine`` picks this engine only
where ``why_not`` finds nothing against it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .. import ops
from ..contract import PenaltyTerm, StageResult
from .batch import Batch, checked_players, penalty_names
from .losses import LOSSES, Squeeze, d_loss_terms, g_loss_terms

_LEAVES = (nn.Linear, nn.ReLU)


def _structure(net: nn.Module) -> tuple[list[nn.Linear], bool] | None:
    """(the Linear layers, whether it ends in Squeeze) of ``Linear (ReLU Linear)* [Squeeze]`` built from
    nested nn.Sequentials without hooks, else None."""
    if not isinstance(net, nn.Sequential):
        return None
    leaves = []
    for m in net.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return None
        if isinstance(m, nn.Sequential):
            continue
        if not isinstance(m, (*_LEAVES, Squeeze)):
            return None
        leaves.append(m)
    squeeze = bool(leaves) and isinstance(leaves[-1], Squeeze)
    body = leaves[:-1] if squeeze else leaves
    if not body or len(body) % 2 == 0:
        return None
    for i, m in enumerate(body):
        if not isinstance(m, nn.Linear if i % 2 == 0 else nn.ReLU):
            return None
        if isinstance(m, nn.Linear) and m.bias is None:
            return None
    layers = body[::2]
    if squeeze and layers[-1].out_features != 1:
        return None
    return layers, squeeze


def linear_layers(net: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers of ``Linear (ReLU Linear)* [Squeeze]`` built from nested nn.Sequentials, else None."""
    found = _structure(net)
    return None if found is None else found[0]


def why_not(
    D: nn.Module,
    G: nn.Module,
    loss: str = "ns",
    reg_method: str = "double_backward",
    autocast: bool = False,
    conditional: bool = False,
    g_params=None,
    penalties: Iterable[str] = (),
) -> str | None:
    """Why the hand-derived gradients cannot stand in for autograd for this pair and these options, or None when
    they can. Checked on every call of game_gradients (hooks, frozen parameters and options can change)."""
    if loss not in LOSSES:
        return f"unknown loss {loss!r}"
    if autocast:
        return "autocast (bf16) runs through autograd"
    if conditional:
        return "class-conditional pairs run through autograd"
    if g_params is not None:
        return "g_params= (a subset of G's parameters) runs through autograd"
    field = [p for p in penalties if p != "g_reg"]
    if field:
        return f"the gradient penalties {tuple(field)} run through autograd (only g_reg is derived here)"
    if reg_method not in ("double_backward", "jvp"):
        return f"reg_method={reg_method!r} is an approximation; only the exact g_reg is derived here"
    return _checked_layers(D, G)[1]


def _checked_layers(D: nn.Module, G: nn.Module):
    """((D's Linear layers, G's), None), or (None, why the pair is not one this module handles)."""
    d, g = _structure(D), _structure(G)
    if d is None or g is None:
        return None, "the players are not plain ReLU MLPs (Linear, ReLU, ..., Linear[, Squeeze])"
    if not d[1]:
        return None, "D must end in Squeeze (one logit per sample)"
    if any(not p.requires_grad for lin in d[0] + g[0] for p in (lin.weight, lin.bias)):
        return None, "some parameters are frozen (requires_grad=False)"
    return (d[0], g[0]), None


# -- one network ----------------------------------------------------------------------------------------
def _forward(layers: Sequence[nn.Linear], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The output (pre-activation of the last layer) and every layer's input: [x, h_1, ..., h_{L-1}]."""
    hs = [x]
    for i, lin in enumerate(layers):
        a = torch.addmm(lin.bias, hs[-1], lin.weight.t())
        if i == len(layers) - 1:
            return a, hs
        hs.append(a.relu_())
    raise AssertionError("unreachable")


def _grad_of(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def _backward(
    layers: Sequence[nn.Linear],
    hs: Sequence[torch.Tensor],
    delta: torch.Tensor,
    into: list[tuple[torch.Tensor, torch.Tensor]] | None,
    need_input: bool = False,
    deltas: list | None = None,
) -> torch.Tensor | None:
    """Backpropagate ``delta`` (dl/d output) through the layers.

    ``into``: one (weight-grad, bias-grad) pair per layer to accumulate the parameter gradients into, or
    None for none. ``deltas`` (optional) collects dl/d(pre-activation) per layer, last layer first.
    Returns dl/d input when ``need_input``.
    """
    for i in range(len(layers) - 1, -1, -1):
        if deltas is not None:
            deltas.append(delta)
        if into is not None:
            gw, gb = into[i]
            gw.addmm_(delta.t(), hs[i])
            gb.add_(delta.sum(0))
        if i == 0 and not need_input:
            return None
        up = delta.mm(layers[i].weight)
        delta = torch.ops.aten.threshold_backward(up, hs[i], 0) if i > 0 else up
    return delta


# -- the game -------------------------------------------------------------------------------------------


def checked_request(batch: Batch, players: Sequence[int], penalties: Iterable[str], instead: str):
    """A hand-derived engine's checks of one call: (players, whether g_reg is asked, need_d, need_g). It computes
    g_reg only (``instead`` names the engine for the rest), and g_reg and a new fake need G's gradient."""
    players, pens = checked_players(players), penalty_names(penalties)
    if [p for p in pens if p != "g_reg"]:
        raise ValueError(f"the hand-derived engine computes g_reg only, not {pens} (use {instead})")
    greg, need_d, need_g = "g_reg" in pens, 0 in players, 1 in players
    if greg and not need_g:
        raise ValueError("g_reg needs the generator's gradient (players must include 1)")
    if batch.fake is not None and need_g:
        raise ValueError("batch.fake can only be reused when the generator's gradient is not needed")
    return players, greg, need_d, need_g


class MLPPair:
    """The hand-derived game gradients of one (D, G) pair of ReLU MLPs (a gradient engine, as
    game/autograd.py's AutogradEngine), its structure checked once at construction.

    Raises ValueError naming the reason when the pair is not one it handles (the options are checked by
    ``why_not``, which ``choose_engine`` consults; a caller that builds an MLPPair has checked them itself).
    """

    name = "mlp"

    def __init__(self, D: nn.Module, G: nn.Module, loss: str = "ns") -> None:
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {tuple(LOSSES)}")
        layers, why = _checked_layers(D, G)
        if why is not None:
            raise ValueError(f"the hand-derived gradients cannot run here: {why}")
        self.D, self.G, self.loss = D, G, loss
        self.d_layers, self.g_layers = layers
        self._grads: dict[int, list] = {0: [], 1: []}

    def _into(self, player: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The .grad tensors to accumulate into (made on first use; looked up again if one was replaced)."""
        cached = self._grads[player]
        layers = self.d_layers if player == 0 else self.g_layers
        if len(cached) != len(layers) or any(
            lin.weight.grad is not gw or lin.bias.grad is not gb for lin, (gw, gb) in zip(layers, cached)
        ):
            cached[:] = [(_grad_of(lin.weight), _grad_of(lin.bias)) for lin in layers]
        return cached

    def attach_grads(self) -> None:
        """Make (or find again) the .grad tensors the evaluation accumulates into, now: a compiled caller does this
        before tracing, so the trace starts from them (game/compiled.py)."""
        self._into(0)
        self._into(1)

    @torch.no_grad()
    def __call__(
        self, batch: Batch, players: Sequence[int] = (0, 1), penalties: Iterable[str] = (), losses: bool = True
    ) -> StageResult:
        """The AutogradEngine's evaluation for this pair, without autograd.

        Accumulates dl_D/dtheta (player 0) and dl_G/dphi (player 1) into ``.grad``; with "g_reg" in
        ``penalties`` the result's term g_reg carries its value ||dl_G/dphi||^2 (for the logs) and its exact
        gradient w.r.t. D's parameters (one tensor per parameter), which the optimiser takes in place of a double
        backward. ``losses=False`` leaves out the loss values (only the logs read them). The batch's instance
        noise is constant, so the gradients and g_reg's tangent pass through it unchanged.
        """
        if not isinstance(batch, Batch):
            raise TypeError(f"the engine takes a game.Batch, got {type(batch).__name__}")
        players, greg, need_d, need_g = checked_request(batch, players, penalties, "the autograd engine")
        loss, values = self.loss, losses
        real, z, fake = batch.real, batch.z, batch.fake
        d_layers, g_layers = self.d_layers, self.g_layers
        if fake is None:
            fake, g_hs = _forward(g_layers, z)
        out = StageResult(fake=fake)
        noise_r, noise_f = batch.noise if batch.noise is not None else (None, None)
        if noise_r is not None:
            real = real + noise_r
        x_fake = fake if noise_f is None else fake + noise_f
        nr = real.shape[0]
        if need_d:
            logits, d_hs = _forward(d_layers, torch.cat([real, x_fake]))
            logits = logits.squeeze(-1)
            lr, lf = logits[:nr], logits[nr:]
            ld, dr, df = d_loss_terms(loss, lr, lf, values)
            _backward(d_layers, d_hs, torch.cat([dr, df]).unsqueeze(-1), self._into(0))
            if values:
                out.loss_d = ld.float()
            if need_g:
                f_hs = [h[nr:] for h in d_hs]
        elif need_g:
            lf, f_hs = _forward(d_layers, x_fake)
            lf = lf.squeeze(-1)
        if not need_g:
            return out

        lg, dg, curv = g_loss_terms(loss, lf, greg, values or greg)
        if values or greg:
            out.loss_g = lg.float()
        d_deltas: list[torch.Tensor] = []
        dfake = _backward(d_layers, f_hs, dg.unsqueeze(-1), None, need_input=True, deltas=d_deltas)
        if not greg:
            _backward(g_layers, g_hs, dfake, self._into(1))
            return out
        g_phi = [(torch.zeros_like(lin.weight), torch.zeros_like(lin.bias)) for lin in g_layers]
        _backward(g_layers, g_hs, dfake, g_phi)
        for (gw, gb), (into_w, into_b) in zip(g_phi, self._into(1)):
            into_w.add_(gw)
            into_b.add_(gb)
        value = ops.sqnorm([t for pair in g_phi for t in pair])
        out.terms["g_reg"] = PenaltyTerm(
            (0,), value, _g_reg_grad(d_layers, g_layers, g_hs, f_hs, d_deltas, curv, g_phi)
        )
        return out


def _g_reg_grad(d_layers, g_layers, g_hs, f_hs, d_deltas, curv, g_phi) -> list[torch.Tensor]:
    """2 x the directional derivative of grad_theta l_G along phi's tangent g_phi (forward-over-reverse)."""
    # G's forward, tangent only: a' = h'_{l-1} W^T + h_{l-1} W'^T + b'; h' = a' masked by the ReLU.
    tangent = None
    for i, (lin, (gw, gb)) in enumerate(zip(g_layers, g_phi)):
        a = torch.addmm(gb, g_hs[i], gw.t())
        if tangent is not None:
            a.addmm_(tangent, lin.weight.t())
        tangent = torch.ops.aten.threshold_backward(a, g_hs[i + 1], 0) if i + 1 < len(g_layers) else a
    f_tangents = [tangent]  # the fakes' tangent, then every hidden layer's of D (D's parameters fixed)
    for i, lin in enumerate(d_layers[:-1]):
        f_tangents.append(torch.ops.aten.threshold_backward(f_tangents[-1].mm(lin.weight.t()), f_hs[i + 1], 0))
    logit_tangent = f_tangents[-1].mm(d_layers[-1].weight.t())
    # D's backward, tangent only: W-grad' = delta'^T h + delta^T h'; delta'_{l-1} = (delta'_l W) masked.
    delta_t = logit_tangent.mul_(curv.unsqueeze(-1))
    out: list[torch.Tensor] = []
    for i in range(len(d_layers) - 1, -1, -1):
        delta = d_deltas[len(d_layers) - 1 - i]
        gw = delta_t.t().mm(f_hs[i]).addmm_(delta.t(), f_tangents[i]).mul_(2.0)
        out[:0] = [gw, delta_t.sum(0).mul_(2.0)]
        if i > 0:
            delta_t = torch.ops.aten.threshold_backward(delta_t.mm(d_layers[i].weight), f_hs[i], 0)
    return out
