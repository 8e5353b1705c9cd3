"""Gradient penalties, and THE one function that turns a penalty into the regularised players' gradients.

The family (each a scalar whose gradient is added, times its weight, to the gradients of the players it
regularises; every squared norm goes through the fused ``ops.sqnorm``, differentiable twice):

* ``g_reg`` (ODE-GAN): ||dl_G/dphi||^2 (squared L2 over G's gradient tensors, no 1/2), regularising D;
* ``r1`` / ``r2`` (Mescheder et al. 2018): 1/2 E||grad_x D(x)||^2 on real / on generated samples, so that
  weight gamma gives gamma/2 E||.||^2; regularising D;
* ``wgan_gp`` (Gulrajani et al. 2017): E(||grad_x D(x^)|| - 1)^2 on x^ = u x_real + (1 - u) x_fake,
  u ~ U[0, 1] per sample; regularising D;
* ``consensus`` (Mescheder et al. 2017): 1/2 ||v||^2 of the whole field v = [dl_D/dtheta, dl_G/dphi],
  regularising both players.

The input-gradient penalties take grad_x of D's summed outputs, which is each sample's own gradient as
long as D treats samples independently (no batch norm in D: true of every D in this package).

``apply_penalty`` adds weight x gradient into ``.grad`` (or an out buffer) for every optimiser. g_reg has
three ways to be computed, all exact in the limit:

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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .. import ops
from .contract import Stage, StageResult, as_result
from .regularisers import FIELD_PENALTIES, Penalty, due

METHODS = ("double_backward", "finite_difference", "jvp")


def apply_penalty(
    result: StageResult | Mapping | None,
    params,
    weight: float | Mapping[str, float],
    out=None,
    players: Sequence[int] | None = None,
):
    """Turn a closure's penalties into the regularised players' gradients: the one path every optimiser uses.

    ``weight`` a number: g_reg alone (the form before the penalty family). Adds ``weight`` x g_reg to each
    parameter's ``.grad`` of ``params``, the regularised player's parameters (``out=None``: folded into this
    evaluation's gradient), or writes ``weight`` x it into ``out`` (one tensor per parameter: the ODE
    stepper's after-step buffer). The penalty comes as ``result.penalty_grad`` (its gradient, given) or as
    ``result.penalty`` (a 0-dim tensor differentiated here by one more backward). Returns the penalty's
    value, detached (None when only its gradient was given).

    ``weight`` a mapping {name: weight}: each named penalty of the result ("g_reg", or a name in
    ``result.terms``) times its weight into the ``.grad`` of the players it regularises, every player's
    parameters given by ``params`` (a FlatParams, or one parameter list per player); ``players`` (optional)
    keeps only those players' parts (a decoupled stage); ``out`` (optional) a mapping {name: out tensors}
    for penalties to write out rather than fold in. Terms that regularise the same players are summed and
    differentiated in one backward. Returns {name: value, detached} for the terms that carry a value.
    """
    if isinstance(weight, Mapping):
        return _apply_terms(result, params, weight, out, players)
    params = list(params)
    if result is None or (result.penalty is None and result.penalty_grad is None):
        raise TypeError(
            "with reg > 0 the closure must return a StageResult at stages where stage.penalty is True, with "
            "'penalty' (||dl_G/dphi||^2, differentiable w.r.t. the regularised player's parameters) or "
            "'penalty_grad' (its gradient, one tensor per parameter); game_gradients(..., penalty=stage.penalty) "
            "returns one"
        )
    grads = result.penalty_grad
    if grads is None:
        pen = _checked_value(result.penalty, "'penalty'")
        if out is None:
            # accumulates in place into the flat gradient buffer (this backward builds no graph)
            (pen * weight).backward(inputs=params)
            return pen.detach()
        grads = torch.autograd.grad(pen, params, materialize_grads=True)
    _write(grads, params, weight, out)
    return result.penalty.detach() if isinstance(result.penalty, torch.Tensor) else None


def apply_stage_penalties(
    out,
    flat,
    stage: Stage,
    specs: Sequence[Penalty] = (),
    reg_weight: float = 0.0,
    reg_out: Sequence[torch.Tensor] | None = None,
    regularised: int = 0,
):
    """What an optimiser does with a closure's return value at one gradient evaluation: the penalties the stage
    asked for, through ``apply_penalty``. g_reg (``stage.penalty``) with ``reg_weight`` into the regularised
    player's gradient, or into ``reg_out`` (the after-step buffer); the field penalties (``stage.penalties``) with
    their weights from ``specs`` (lazy ones k-scaled), restricted to ``stage.players``. The values land in the
    result (``penalty``; each term's ``value``) for the logs. Returns ``out`` as is when nothing was asked."""
    if not stage.penalty and not stage.penalties:
        return out
    result = as_result(out)
    if not stage.penalties:  # g_reg alone: exactly the path before the penalty family
        params = flat.parameters(regularised)
        value = (
            apply_penalty(result, params, reg_weight)
            if reg_out is None
            else apply_penalty(result, params, 1.0, reg_out)
        )
    else:
        if regularised != 0:
            raise ValueError("the gradient penalties need D as player 0 of FlatParams (0 = D, 1 = G)")
        weights = due(specs, stage.step, stage.players)
        if set(weights) != set(stage.penalties):
            raise ValueError(f"stage.penalties {stage.penalties} are not the penalties due here: {tuple(weights)}")
        if stage.penalty:
            weights["g_reg"] = reg_weight if reg_out is None else 1.0
        values = apply_penalty(result, flat, weights, None if reg_out is None else {"g_reg": reg_out}, stage.players)
        value = values.get("g_reg")
    if value is not None:
        result.penalty = value
    return result


def _checked_value(pen, what: str) -> torch.Tensor:
    if not isinstance(pen, torch.Tensor) or pen.dim() != 0 or pen.grad_fn is None:
        raise TypeError(
            f"the closure's {what} must be a 0-dim tensor with a graph to the regularised player's "
            "parameters (take the gradients inside it with torch.autograd.grad(create_graph=True))"
        )
    return pen


def _write(grads, params, weight, out, what: str = "'penalty_grad'") -> None:
    """weight x grads added into the params' .grad (out None) or written into out."""
    grads = list(grads)
    if len(grads) != len(params) or any(g.shape != p.shape for g, p in zip(grads, params)):
        raise ValueError(f"{what} must hold one tensor per parameter of the regularised player(s), shaped like it")
    if out is None:
        torch._foreach_add_([p.grad for p in params], grads, alpha=weight)
    else:
        for o, g in zip(out, grads):
            o.copy_(g) if weight == 1 else torch.mul(g, weight, out=o)


def _apply_terms(result, params, weights: Mapping[str, float], out, players) -> dict[str, torch.Tensor]:
    result = as_result(result)
    out = out or {}
    per_player = [params.parameters(i) for i in range(len(params.segments))] if hasattr(params, "segments") else params
    values: dict[str, torch.Tensor] = {}
    pending = []  # (weight, its term's value, the parameters it regularises) for the backward passes
    for name, w in weights.items():
        term = None if result is None else result.term(name)
        if term is None:
            raise TypeError(
                f"the optimiser asked for penalty {name!r} (stage.penalty / stage.penalties) but the closure's "
                f"result has none: return a StageResult whose terms hold a PenaltyTerm {name!r} (game_gradients("
                "..., penalty=stage.penalty, penalties=stage.penalties) returns one)"
            )
        if term.value is not None:
            values[name] = term.value.detach()
        _check_term_players(name, term.players, players, len(per_player))
        kept = [q for q in term.players if players is None or q in players]
        if not kept or w == 0:
            continue
        plist = [p for q in kept for p in per_player[q]]
        if term.grad is not None:
            counts = {q: len(list(per_player[q])) for q in term.players}
            grads, i = {}, 0
            for q in term.players:
                grads[q] = list(term.grad)[i : i + counts[q]]
                i += counts[q]
            _write([g for q in kept for g in grads[q]], plist, w, out.get(name), f"penalty {name!r}'s grad")
        elif name in out:
            g = torch.autograd.grad(_checked_value(term.value, name), plist, retain_graph=True, materialize_grads=True)
            _write(g, plist, w, out[name])
        else:
            pending.append((w, _checked_value(term.value, f"penalty {name!r}"), plist))
    groups: dict[tuple[int, ...], tuple[torch.Tensor, list]] = {}
    for w, v, plist in pending:  # one backward per set of parameters: a penalty reaches only its own players
        key = tuple(id(p) for p in plist)
        total, _ = groups.get(key, (None, plist))
        groups[key] = (v * w if total is None else total + v * w, plist)
    for i, (total, plist) in enumerate(groups.values()):
        total.backward(inputs=plist, retain_graph=i < len(groups) - 1)
    return values


def _check_term_players(name: str, got, asked, nplayers: int) -> None:
    """A term must regularise the players its penalty regularises (those of them the call serves), and no other:
    a wrong ``players`` would drop the penalty, or move a player it does not touch, without a word."""
    if name not in FIELD_PENALTIES:
        return  # g_reg: the player it regularises is the caller's (its term names it)
    allowed = set(FIELD_PENALTIES[name])
    needed = allowed & set(range(nplayers) if asked is None else asked)
    got = set(got)
    if not got <= allowed or not needed <= got:
        raise ValueError(
            f"penalty {name!r}'s PenaltyTerm says it regularises players {sorted(got)}, but {name!r} regularises "
            f"{sorted(allowed)}{' and this call serves ' + str(sorted(asked)) if asked is not None else ''}: "
            f"its players must include {sorted(needed)} and lie within {sorted(allowed)}"
        )


def generator_grad_sqnorm(loss_g: torch.Tensor, g_params: Sequence[torch.Tensor], backend: str = "auto"):
    """(||dl_G/dphi||^2 as a scalar differentiable w.r.t. D, the gradients dl_G/dphi detached)."""
    g_phi = torch.autograd.grad(loss_g, list(g_params), create_graph=True)
    return ops.sqnorm(g_phi, backend=backend), [g.detach() for g in g_phi]


def fd_epsilon(params: Sequence[torch.Tensor], backend: str = "auto") -> torch.Tensor:
    """cbrt(machine eps) * max(1, rms of the parameters): the central difference's step, as a 0-dim
    tensor on the parameters' device (no host sync, so the step stays capturable)."""
    params = [p.detach() for p in params]
    n = sum(p.numel() for p in params)
    rms = (ops.sqnorm(params, backend=backend) / max(n, 1)).sqrt()
    return float(torch.finfo(params[0].dtype).eps) ** (1 / 3) * rms.clamp_min(1.0)


def _buffers_of(module: nn.Module) -> list[torch.Tensor]:
    return [b for b in module.buffers()]


def penalty_grad(
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
        raise ValueError(f"penalty method must be one of {METHODS}, got {method!r}")
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
                "the jvp penalty cannot trace BatchNorm's running-statistic updates in G; use "
                "method='double_backward' or 'finite_difference'"
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


def regulariser_grad(
    loss_g: torch.Tensor,
    d_params: Sequence[torch.Tensor],
    g_params: Sequence[torch.Tensor],
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """g_reg by double backward from a generator loss already computed, written into a flat buffer.

    ``out`` (optional) is a flat buffer with at least as many elements as D's parameters; tensors
    are laid out back to back in ``d_params`` order.
    """
    d_params = list(d_params)
    n = sum(p.numel() for p in d_params)
    if out is None:
        out = torch.empty(n, dtype=d_params[0].dtype, device=d_params[0].device)
    elif out.dim() != 1 or out.numel() < n:
        raise ValueError(f"out must be a flat buffer of at least {n} elements, got shape {tuple(out.shape)}")
    sq, _ = generator_grad_sqnorm(loss_g, g_params, backend=backend)
    grads = torch.autograd.grad(sq, d_params, allow_unused=True, materialize_grads=True)
    off = 0
    for p, g in zip(d_params, grads):
        out[off : off + p.numel()].copy_(g.reshape(-1))
        off += p.numel()
    return out
