"""The closure contract: what a stepper asks of one gradient evaluation (Stage) and what comes back (StageResult).

Every optimiser of this package (the ODE stepper and the Adam/SGD baselines) calls ``closure(stage)`` once
per gradient evaluation; a closure that takes no argument is called as ``closure()`` (torch.optim's form).
Before each call the optimiser zeroes the flat gradients (one memset). The closure then:

1. accumulates, for each player in ``stage.players`` (0 = D, 1 = G), the gradient of that player's own
   loss at the current parameters into ``p.grad`` -- ``loss.backward()`` or ``torch.autograd.backward``
   do; the ``.grad`` tensors are views of the flat gradient buffer, so assigning ``p.grad = g`` moves
   nothing;
2. when ``stage.penalty`` is set, returns a ``StageResult`` carrying the regulariser: either ``penalty``,
   the value ||dl_G/dphi||^2 as a 0-dim tensor that autograd can differentiate with respect to the
   regularised player's parameters (``torch.autograd.grad(..., create_graph=True)``), or
   ``penalty_grad``, its gradient given directly (one tensor per parameter of the regularised player,
   shaped like it), with ``penalty`` then only logged;
3. for each name in ``stage.penalties`` (the gradient penalties of the field: r1, r2, wgan_gp, consensus;
   game/penalty.py defines them), returns a ``PenaltyTerm`` of that name in ``StageResult.terms``, in the
   same two forms: ``value`` differentiable w.r.t. the parameters of the players it regularises, or
   ``grad`` given (one tensor per parameter of those players, in player order). The optimiser weighs
   each and adds it to the players' gradients (game.penalty.apply_penalty);
4. may return anything else it wants back: ``step()`` returns what the closure returned at stage 0, with
   tensors detached (a ``StageResult``, a loss tensor, or None). A mapping with StageResult's field names
   is taken as a StageResult.

``game_gradients`` (autograd) and the hand-derived engine return StageResults that satisfy all of this.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Stage:
    """What the optimiser asks of one closure call.

    index: the stage within the step (0: the step's start point); step: steps taken before this one;
    players: the players whose gradients the closure must fill (all of them, except one at a time in the
    decoupled stages); penalty: whether the closure must return ODE-GAN's regulariser g_reg (see the
    module's text); penalties: the names of the other gradient penalties it must return as terms.
    """

    index: int
    step: int
    players: tuple[int, ...]
    penalty: bool
    penalties: tuple[str, ...] = ()


@dataclass
class PenaltyTerm:
    """One gradient penalty a closure computed: its name, the players it regularises (0 = D, 1 = G), and either
    its ``value`` (0-dim, differentiable w.r.t. those players' parameters) or its gradient ``grad`` given (one
    tensor per parameter of those players, in player order; ``value`` then only logged)."""

    name: str
    players: tuple[int, ...]
    value: torch.Tensor | None = None
    grad: Sequence[torch.Tensor] | None = None

    def detached(self) -> PenaltyTerm:
        return PenaltyTerm(self.name, self.players, _detach(self.value), None)


@dataclass
class StageResult:
    """What a closure returns for one stage: the losses and the regulariser (for the logs and the penalty),
    and the generator samples it drew (``fake``, so later stages can reuse them). ``penalty`` and
    ``penalty_grad`` are g_reg's; ``terms`` holds the other gradient penalties asked for (Stage.penalties)."""

    loss_d: torch.Tensor | None = None
    loss_g: torch.Tensor | None = None
    penalty: torch.Tensor | None = None
    penalty_grad: Sequence[torch.Tensor] | None = None
    fake: torch.Tensor | None = None
    terms: list[PenaltyTerm] = field(default_factory=list)

    def detached(self) -> StageResult:
        """A copy without the penalties' gradients and with every tensor detached (what ``step()`` returns)."""
        return StageResult(
            *(_detach(getattr(self, f)) for f in ("loss_d", "loss_g", "penalty")),
            None,
            _detach(self.fake),
            [t.detached() for t in self.terms],
        )

    def term(self, name: str) -> PenaltyTerm | None:
        """The penalty called ``name``: one of ``terms``, or g_reg ("g_reg") from ``penalty``/``penalty_grad``."""
        for t in self.terms:
            if t.name == name:
                return t
        if name == "g_reg" and (self.penalty is not None or self.penalty_grad is not None):
            return PenaltyTerm("g_reg", (0,), self.penalty, self.penalty_grad)
        return None

    def scalars(self) -> dict[str, torch.Tensor]:
        """The 0-dim values the logs average: loss_d, loss_g, penalty (g_reg) and each term's value by its name."""
        out = {k: v for k in ("loss_d", "loss_g", "penalty") if (v := getattr(self, k)) is not None}
        out.update({t.name: t.value.detach().float() for t in self.terms if t.value is not None})
        return out


FIELDS = tuple(f.name for f in dataclasses.fields(StageResult))


def _detach(v):
    return v.detach() if isinstance(v, torch.Tensor) else v


def as_result(out) -> StageResult | None:
    """The closure's return value as a StageResult (None for anything else: a loss tensor, None)."""
    if isinstance(out, StageResult):
        return out
    if isinstance(out, Mapping):
        unknown = set(out) - set(FIELDS)
        if unknown:
            raise TypeError(f"the closure returned keys {sorted(unknown)}; a StageResult has {list(FIELDS)}")
        return StageResult(**out)
    return None


def returned(out):
    """What ``step()`` hands back for the closure's stage-0 return value: a StageResult (a mapping of its field
    names becomes one) with its tensors detached; any other mapping or value with its tensors detached."""
    if isinstance(out, StageResult):
        return out.detached()
    if isinstance(out, Mapping):
        if set(out) <= set(FIELDS):
            return as_result(out).detached()
        return type(out)((k, _detach(v)) for k, v in out.items()) if isinstance(out, dict) else out
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
