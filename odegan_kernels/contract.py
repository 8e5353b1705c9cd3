"""The closure contract: what an optimiser asks of one gradient evaluation (Stage), what comes back (StageResult,
with a PenaltyTerm per penalty), the penalties an optimiser applies (Penalty, due), and the one function that adds
the penalties' gradients to the players' gradients (apply_penalties). Below both the integrator (ode/) and the game
(game/): an optimiser needs only this to drive a closure, and a closure only this to answer one.

Every optimiser of this package (the ODE stepper and the Adam/SGD baselines) calls ``closure(stage)`` once per
gradient evaluation; a closure that takes no argument is called as ``closure()`` (torch.optim's form). Before each
call the optimiser zeroes the flat gradients (one memset). The closure then:

1. accumulates, for each player in ``stage.players`` (0 = D, 1 = G), the gradient of that player's own loss at the
   current parameters into ``p.grad`` (``loss.backward()`` does; the ``.grad`` tensors are views of the flat
   gradient buffer, so assigning ``p.grad = g`` moves nothing);
2. for each penalty named in ``stage.penalties`` (``PENALTIES``: g_reg, ODE-GAN's regulariser, and r1, r2,
   wgan_gp, consensus), returns a ``PenaltyTerm`` under that name in ``StageResult.terms``: either its ``value``, a
   0-dim tensor autograd can differentiate with respect to the parameters of the players it regularises, or its
   gradient ``grad``, given (one tensor per parameter of those players, in player order; ``value`` is then only
   logged). The optimiser weighs each term and adds its gradient to the players' gradients, or routes it elsewhere
   (the ODE stepper's after-step g_reg): ``apply_penalties``;
3. may return anything else it wants back: ``step()`` returns what the closure returned at stage 0, with tensors
   detached (a ``StageResult``, a loss tensor, or None).

``game.game_gradients`` returns StageResults that satisfy all of this.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .flat import FlatParams

PENALTIES: dict[str, tuple[int, ...]] = {
    "g_reg": (0,),  # ODE-GAN's ||dl_G/dphi||^2, differentiated w.r.t. D
    "r1": (0,),
    "r2": (0,),
    "wgan_gp": (0,),
    "consensus": (0, 1),
}
"""Every penalty of the contract and the players it regularises (0 = D, 1 = G); game/penalties.py defines them."""


@dataclass(frozen=True)
class Stage:
    """What the optimiser asks of one closure call.

    index: the stage within the step (0: the step's start point); step: steps taken before this one; players: the
    players whose gradients the closure must fill (all of them, except one at a time in the decoupled stages);
    penalties: the penalties due here, {name: weight} (names in PENALTIES), each to be returned as a term.
    """

    index: int
    step: int
    players: tuple[int, ...]
    penalties: Mapping[str, float] = field(default_factory=dict)


@dataclass
class PenaltyTerm:
    """One penalty a closure computed: the players it regularises (0 = D, 1 = G), and its ``value`` (0-dim,
    differentiable w.r.t. those players' parameters) or its gradient ``grad``, given (one tensor per parameter of
    those players, in player order; ``value`` then only logged)."""

    players: tuple[int, ...]
    value: torch.Tensor | None = None
    grad: Sequence[torch.Tensor] | None = None

    def detached(self) -> PenaltyTerm:
        return PenaltyTerm(self.players, _detach(self.value), None)


@dataclass
class StageResult:
    """What a closure returns for one stage: the players' losses, one term per penalty asked for (``terms``, by
    name), and the generator samples it drew (``fake``, so later stages can reuse them)."""

    loss_d: torch.Tensor | None = None
    loss_g: torch.Tensor | None = None
    terms: dict[str, PenaltyTerm] = field(default_factory=dict)
    fake: torch.Tensor | None = None

    def detached(self) -> StageResult:
        """A copy without the terms' gradients and with every tensor detached (what ``step()`` returns)."""
        return StageResult(
            _detach(self.loss_d),
            _detach(self.loss_g),
            {name: t.detached() for name, t in self.terms.items()},
            _detach(self.fake),
        )

    def value(self, name: str) -> torch.Tensor | None:
        """The value of penalty ``name`` (None when it was not computed, or came as a gradient alone)."""
        term = self.terms.get(name)
        return None if term is None else term.value

    def scalars(self) -> dict[str, torch.Tensor]:
        """The 0-dim values the logs average, as the closure gave them (detached): loss_d, loss_g and each term's
        value by its name (g_reg, r1, ...)."""
        out = {k: v for k in ("loss_d", "loss_g") if (v := getattr(self, k)) is not None}
        out.update({name: t.value.detach() for name, t in self.terms.items() if t.value is not None})
        return out


def _detach(v):
    return v.detach() if isinstance(v, torch.Tensor) else v


def returned(out):
    """What ``step()`` hands back for the closure's stage-0 return value: a StageResult with its tensors detached,
    any other mapping or value with its tensors detached."""
    if isinstance(out, StageResult):
        return out.detached()
    if isinstance(out, dict):
        return type(out)((k, _detach(v)) for k, v in out.items())
    return _detach(out)


_TAKES_STAGE: dict = {}


def stage_caller(closure):
    """``closure`` as a function of the Stage: it gets the Stage when it can take one argument, else it is called
    with none (torch.optim's form). Read from its signature once per function."""
    key = getattr(closure, "__code__", None) or type(closure)
    takes = _TAKES_STAGE.get(key)
    if takes is None:
        try:
            inspect.signature(closure).bind(None)
            takes = True
        except TypeError:
            takes = False
        except ValueError:  # no signature to read (some builtins): pass the stage
            takes = True
        if getattr(closure, "__code__", None) is not None:
            _TAKES_STAGE[key] = takes
    return closure if takes else (lambda stage: closure())


# -- the penalties an optimiser applies ------------------------------------------------------------------------
@dataclass(frozen=True)
class Penalty:
    """One gradient penalty of the field (r1, r2, wgan_gp, consensus) with its weight; ``every`` > 1 makes it lazy
    (StyleGAN2's lazy R1): applied only at steps 0, k, 2k, ... and then weighted ``weight * every``, so its mean
    effect is unchanged. (g_reg is the optimisers' own: its weight is their ``reg=``.)"""

    name: str
    weight: float
    every: int = 1

    def __post_init__(self) -> None:
        if self.name == "g_reg":
            raise ValueError("g_reg is the optimisers' own regulariser: give its weight as reg= (and reg_at=)")
        if self.name not in PENALTIES:
            raise ValueError(
                f"unknown penalty {self.name!r}; choose from {tuple(k for k in PENALTIES if k != 'g_reg')}"
            )
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            raise ValueError(f"the weight of penalty {self.name!r} must be a finite number >= 0, got {w!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, numbers.Integral) or self.every < 1:
            raise ValueError(
                f"penalty {self.name!r}: every (the lazy interval) must be an int >= 1, got {self.every!r}"
            )
        object.__setattr__(self, "weight", float(w))  # numpy and other real scalars as plain numbers
        object.__setattr__(self, "every", int(self.every))
        if not math.isfinite(self.weight * self.every):
            raise ValueError(
                f"penalty {self.name!r}: weight x every (its weight on the steps it applies) overflows: "
                f"{self.weight} x {self.every}"
            )

    @property
    def players(self) -> tuple[int, ...]:
        return PENALTIES[self.name]


def penalty_specs(penalties: Mapping | Iterable[Penalty] | None) -> tuple[Penalty, ...]:
    """The field penalties an optimiser applies, from Penalty objects or a mapping {name: weight} or
    {name: (weight, every)}; zero weights are dropped, a name given twice is refused."""
    if penalties is None:
        return ()
    if isinstance(penalties, Mapping):
        specs = []
        for k, v in penalties.items():
            if isinstance(v, (tuple, list)) and len(v) not in (1, 2):
                raise ValueError(f"penalty {k!r}: give a weight or (weight, every), got {v!r}")
            specs.append(Penalty(k, *v) if isinstance(v, (tuple, list)) else Penalty(k, v))
    else:
        specs = list(penalties)
        if any(not isinstance(p, Penalty) for p in specs):
            raise TypeError("penalties must be a mapping {name: weight} or a sequence of Penalty")
    names = [p.name for p in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"a penalty is given twice: {names}")
    return tuple(p for p in specs if p.weight > 0)


def due(specs: Sequence[Penalty], step: int | None, players: Sequence[int], names=None) -> dict[str, float]:
    """{name: weight x every} of the penalties due at ``step`` that regularise any of ``players``; with ``names``
    (and step None: a traced step, which has no step number) those of the penalties named there."""
    now = (lambda p: p.name in names) if names is not None else (lambda p: step % p.every == 0)
    return {p.name: p.weight * p.every for p in specs if now(p) and set(p.players) & set(players)}


def check_reg(reg) -> float:
    """lambda, g_reg's weight, as a float; or a TypeError / ValueError naming it."""
    if isinstance(reg, bool) or not isinstance(reg, (int, float)):
        raise TypeError(f"reg (the regulariser weight lambda) must be a number, got {reg!r}")
    if not math.isfinite(reg) or reg < 0:
        raise ValueError(f"reg (the regulariser weight lambda) must be >= 0, got {reg}")
    return float(reg)


# -- the one path from a closure's terms to the players' gradients ------------------------------------------------
def apply_penalties(
    result,
    flat: FlatParams,
    weights: Mapping[str, float],
    players: Sequence[int] | None = None,
    out: Mapping[str, Sequence[torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Turn a closure's penalty terms into the players' gradients: the one path every optimiser uses.

    For each penalty ``name`` in ``weights``, the term of that name in ``result.terms`` times its weight is added
    to the ``.grad`` of the players it regularises (their parameters from ``flat``), or, for a name in ``out``,
    written into ``out[name]`` (one tensor per parameter of those players: the ODE stepper's after-step buffer).
    ``players`` (optional) keeps only those players' parts (a decoupled stage). A term comes as its gradient
    (``grad``) or as a ``value`` differentiated here; values that regularise the same parameters are summed and
    differentiated in one backward. Returns {name: value, detached} for the terms that carry a value.
    """
    if not weights:
        return {}
    if not isinstance(result, StageResult):
        raise TypeError(
            f"the optimiser asked for penalties {tuple(weights)} (stage.penalties) but the closure returned "
            f"{type(result).__name__}: return a StageResult whose terms hold a PenaltyTerm per penalty "
            "(game_gradients(..., penalties=stage.penalties) returns one)"
        )
    out = out or {}
    per_player = [flat.player_params(i) for i in range(flat.nplayers)]  # a population's [K, ...] leaves
    values: dict[str, torch.Tensor] = {}
    pending = []  # (weight, its term's value, the parameters it regularises) for the backward passes
    for name, w in weights.items():
        term = result.terms.get(name)
        if term is None:
            raise TypeError(
                f"the optimiser asked for penalty {name!r} (stage.penalties) but the closure's result has none: "
                f"return a StageResult whose terms hold a PenaltyTerm {name!r} (game_gradients(..., "
                "penalties=stage.penalties) returns one)"
            )
        if term.value is not None:
            values[name] = term.value.detach()
        _check_term_players(name, term.players, players, len(per_player))
        kept = [q for q in term.players if players is None or q in players]
        if not kept or w == 0:
            continue
        plist = [p for q in kept for p in per_player[q]]
        if term.grad is not None:
            grads, i = {}, 0
            for q in term.players:
                grads[q] = list(term.grad)[i : i + len(per_player[q])]
                i += len(per_player[q])
            _write([g for q in kept for g in grads[q]], plist, w, out.get(name), f"penalty {name!r}'s grad")
        elif name in out:
            g = torch.autograd.grad(_checked_value(term.value, name), plist, retain_graph=True, materialize_grads=True)
            _write(g, plist, w, out[name], f"penalty {name!r}")
        else:
            pending.append((w, _checked_value(term.value, f"penalty {name!r}"), plist))
    groups: dict[tuple[int, ...], tuple[torch.Tensor, list]] = {}
    for w, v, plist in pending:  # one backward per set of parameters: a penalty reaches only its own players
        key = tuple(id(p) for p in plist)
        total, _ = groups.get(key, (None, plist))
        groups[key] = (v * w if total is None else total + v * w, plist)
    for i, (total, plist) in enumerate(groups.values()):
        # accumulates in place into the flat gradient buffer (this backward builds no graph)
        total.backward(inputs=plist, retain_graph=i < len(groups) - 1)
    return values


def _checked_value(pen, what: str) -> torch.Tensor:
    if not isinstance(pen, torch.Tensor) or pen.dim() != 0 or pen.grad_fn is None:
        raise TypeError(
            f"the closure's {what} must be a 0-dim tensor with a graph to the regularised players' parameters "
            "(take the gradients inside it with torch.autograd.grad(create_graph=True))"
        )
    return pen


def _write(grads, params, weight, out, what: str) -> None:
    """weight x grads added into the params' .grad (out None) or written into out."""
    grads = list(grads)
    if len(grads) != len(params) or any(g.shape != p.shape for g, p in zip(grads, params)):
        raise ValueError(f"{what} must hold one tensor per parameter of the regularised player(s), shaped like it")
    if out is None:
        torch._foreach_add_([p.grad for p in params], grads, alpha=weight)
    else:
        for o, g in zip(out, grads):
            o.copy_(g) if weight == 1 else torch.mul(g, weight, out=o)


def _check_term_players(name: str, got, asked, nplayers: int) -> None:
    """A term must regularise the players its penalty regularises (those of them the call serves), and no other:
    a wrong ``players`` would drop the penalty, or move a player it does not touch, without a word."""
    if name not in PENALTIES:
        raise ValueError(f"unknown penalty {name!r}; the penalties are {tuple(PENALTIES)}")
    allowed = set(PENALTIES[name])
    needed = allowed & set(range(nplayers) if asked is None else asked)
    got = set(got)
    if not got <= allowed or not needed <= got:
        raise ValueError(
            f"penalty {name!r}'s PenaltyTerm says it regularises players {sorted(got)}, but {name!r} regularises "
            f"{sorted(allowed)}{' and this call serves ' + str(sorted(asked)) if asked is not None else ''}: "
            f"its players must include {sorted(needed)} and lie within {sorted(allowed)}"
        )
