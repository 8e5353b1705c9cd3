"""The one place a gradient engine is chosen (autograd, or the hand-derived one for plain ReLU MLP pairs), and
``game_gradients``, one evaluation of the players' gradients through the engine asked for.

An engine is called as ``engine(batch, players, penalties, losses=True)`` and returns a StageResult
(contract.py): game/autograd.py's AutogradEngine (the definition) or game/mlp.py's MLPPair.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..contract import StageResult
from .autograd import AutogradEngine
from .batch import Batch, penalty_names
from .mlp import MLPPair, why_not

ENGINES = ("autograd", "mlp", "auto")


def choose_engine(
    D: nn.Module,
    G: nn.Module,
    engine: str = "auto",
    *,
    loss: str = "ns",
    reg_method: str = "double_backward",
    penalties: Iterable[str] = (),
    autocast: bool = False,
    conditional: bool = False,
    g_params: Sequence[torch.Tensor] | None = None,
    zero_sum: bool | None = None,
    generator: torch.Generator | None = None,
    capture: bool = False,
):
    """(the gradient engine for this pair and these options, why it is not the hand-derived one, or None).

    ``engine``: ``autograd``; ``mlp`` (the hand-derived gradients of a plain ReLU MLP pair: a ValueError names the
    reason when they cannot run); ``auto`` (``mlp`` wherever nothing is against it, else autograd). ``penalties``:
    every penalty the engine will be asked for (a field penalty rules out the hand-derived engine). ``capture``:
    the step will be captured in a CUDA graph, which keeps autograd (a captured step has no per-op overhead
    left for the hand-derived engine to save). The other options are AutogradEngine's.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    pens = penalty_names(penalties)
    why = "engine='autograd' was asked for"
    if engine != "autograd":
        why = why_not(D, G, loss, reg_method, autocast, conditional, g_params, pens)
        if why is None and capture:
            why = "cuda_graph=True captures the autograd step"
        if why is None:
            return MLPPair(D, G, loss), None
        if engine == "mlp":
            raise ValueError(f"engine='mlp' cannot run here: {why}")
    return AutogradEngine(D, G, loss, reg_method, autocast, g_params, zero_sum, generator), why


def game_gradients(
    D: nn.Module,
    G: nn.Module,
    batch: Batch,
    loss: str = "ns",
    players: Sequence[int] = (0, 1),
    penalties: Iterable[str] = (),
    *,
    reg_method: str = "double_backward",
    engine: str = "autograd",
    autocast: bool = False,
    g_params: Sequence[torch.Tensor] | None = None,
    zero_sum: bool | None = None,
    generator: torch.Generator | None = None,
) -> StageResult:
    """Accumulate dl_D/dtheta (player 0) and dl_G/dphi (player 1) into .grad at the current parameters; return a
    StageResult with the losses, a term per penalty named in ``penalties`` (contract.PENALTIES: g_reg, r1, r2,
    wgan_gp, consensus; pass ``stage.penalties``), and the samples used.

    ``batch``: the inputs (game.Batch: the real samples, z, and what else the evaluation uses). ``engine``:
    ``autograd`` (the definition), ``mlp`` or ``auto`` (choose_engine, checked on every call). g_reg comes as its
    value with ``reg_method="double_backward"`` (the optimiser differentiates it), else as its gradient by that
    method (game/g_reg.py), exact from the hand-derived engine. ``autocast``: bf16 forward and backward;
    ``g_params``: a subset of G's parameters; ``zero_sum``: one backward for a zero-sum loss (None: when it
    applies); ``generator``: WGAN-GP's interpolation weights when the batch has none.
    """
    pens = penalty_names(penalties)
    chosen, _ = choose_engine(
        D,
        G,
        engine,
        loss=loss,
        reg_method=reg_method,
        penalties=pens,
        autocast=autocast,
        conditional=isinstance(batch, Batch) and batch.conditional,
        g_params=g_params,
        zero_sum=zero_sum,
        generator=generator,
    )
    return chosen(batch, players, pens)
