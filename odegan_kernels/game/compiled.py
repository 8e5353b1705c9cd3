"""The gradient engine through torch.compile: the hand-derived engine's whole evaluation (forward, backward, g_reg's
forward-over-reverse) as compiled code; the autograd engine's players as compiled modules where every pass is first
order (g_reg by finite differences, no gradient penalty of D); any other engine runs eagerly, with the reason. (A
run's ``compile=true`` with the hand-derived engine traces the whole step instead: ode/compiled.py.)

An evaluation compiles once per kind of call (players, penalties asked for, losses or not, a reused fake batch),
so a run compiles a handful of graphs at its first step and none after (the penalty weights are not part of it).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch

from .. import ops
from ..contract import StageResult
from ..inductor import torch_compile
from .autograd import AutogradEngine
from .batch import Batch
from .mlp import MLPPair


class CompiledEngine:
    """An MLPPair's evaluation through torch.compile; called as the engine is (game/engine.py)."""

    def __init__(self, engine: MLPPair) -> None:
        if not isinstance(engine, MLPPair):
            raise TypeError(f"CompiledEngine compiles the hand-derived engine (MLPPair), got {type(engine).__name__}")
        self.engine = engine
        self.name = f"{engine.name}+compile"
        self._fn = torch_compile(engine.__call__, dynamic=False)
        self._ready = False

    def __call__(
        self, batch: Batch, players: Sequence[int] = (0, 1), penalties: Iterable[str] = (), losses: bool = True
    ) -> StageResult:
        if not self._ready:
            prepare_trace(self.engine, batch.z.dtype, batch.z.device)
            self._ready = True
        return self._fn(batch, tuple(players), tuple(penalties), bool(losses))


def prepare_trace(engine: MLPPair, dtype, device) -> None:
    """Eagerly, before a trace of the hand-derived engine: the fused ops' backend resolved (and csrc loaded) and the
    .grad tensors made (else a second call's guards would see them new)."""
    ops.sqnorm([torch.zeros(1, dtype=dtype, device=device)])
    engine.attach_grads()


def compile_engine(engine, penalties: Iterable[str] = ()):
    """(the engine through torch.compile, None) for the hand-derived engine, and for the autograd engine whose
    gradients are all first-order (``penalties``: every penalty the run asks for), whose players are then compiled
    modules (torch.compile(D), torch.compile(G): their forward and backward passes Inductor's); (the engine
    itself, why it runs eagerly) for any other."""
    if isinstance(engine, MLPPair):
        return CompiledEngine(engine), None
    name = getattr(engine, "name", type(engine).__name__)
    if isinstance(engine, AutogradEngine):
        why = second_order(engine, penalties)
        if why is None:
            players = [torch_compile(m, dynamic=False) for m in (engine.D, engine.G)]
            compiled = copy.copy(engine)  # the same options, the players compiled (they share the parameters)
            compiled.D, compiled.G = players
            compiled.name = f"{engine.name}+compile"
            return compiled, None
        return engine, (
            f"compile=true leaves the autograd engine's passes eager: {why}, which torch.compile cannot "
            "differentiate (only the stage op is compiled)"
        )
    return engine, f"compile=true compiles the hand-derived and autograd engines; the {name} engine runs eagerly"


def second_order(engine, penalties: Iterable[str]) -> str | None:
    """Why the autograd engine's evaluation needs a second-order pass (one line), or None when it is all first
    order: g_reg by finite differences (or no g_reg), and no gradient penalty of D or consensus."""
    pens = [p for p in penalties]
    field = [p for p in pens if p != "g_reg"]
    if field:
        return f"the penalties {tuple(field)} differentiate a gradient (create_graph)"
    if "g_reg" in pens and engine.reg_method != "finite_difference":
        return (
            f"g_reg by reg_method={engine.reg_method!r} differentiates a gradient (reg_method=finite_difference "
            "needs first-order passes only)"
        )
    if engine.autocast:
        return "autocast (bf16) runs eagerly"
    return None
