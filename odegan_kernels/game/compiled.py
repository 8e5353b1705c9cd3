"""The gradient engine through torch.compile (a run's ``compile=true``): the hand-derived engine's whole evaluation
(forward, backward, g_reg's forward-over-reverse) as compiled code; any other engine runs eagerly, with the reason.

An evaluation compiles once per kind of call (players, penalties asked for, losses or not, a reused fake batch),
so a run compiles a handful of graphs at its first step and none after (the penalty weights are not part of it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .. import ops
from ..contract import StageResult
from .batch import Batch
from .mlp import MLPPair


class CompiledEngine:
    """An MLPPair's evaluation through torch.compile; called as the engine is (game/engine.py)."""

    def __init__(self, engine: MLPPair) -> None:
        if not isinstance(engine, MLPPair):
            raise TypeError(f"CompiledEngine compiles the hand-derived engine (MLPPair), got {type(engine).__name__}")
        self.engine = engine
        self.name = f"{engine.name}+compile"
        self._fn = torch.compile(engine.__call__, dynamic=False)
        self._ready = False

    def __call__(
        self, batch: Batch, players: Sequence[int] = (0, 1), penalties: Iterable[str] = (), losses: bool = True
    ) -> StageResult:
        if not self._ready:  # eagerly, outside the trace: the fused ops' backend resolved (and csrc loaded), the
            ops.sqnorm([batch.z.new_zeros(1)])  # .grad tensors made (else the second call's guards see them new)
            self.engine.attach_grads()
            self._ready = True
        return self._fn(batch, tuple(players), tuple(penalties), bool(losses))


def compile_engine(engine):
    """(the engine through torch.compile, None) for the hand-derived engine; (the engine itself, why it runs
    eagerly) for any other."""
    if isinstance(engine, MLPPair):
        return CompiledEngine(engine), None
    return engine, (
        f"compile=true compiles the hand-derived engine only; the {getattr(engine, 'name', type(engine).__name__)} "
        "engine's autograd passes run eagerly (only the stage op is compiled)"
    )
