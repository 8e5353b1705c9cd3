"""The game: losses, the players' gradients (autograd, or hand-derived for MLP pairs), and the penalties."""

from .autograd import ENGINES, game_gradients
from .contract import PenaltyTerm, Stage, StageResult
from .losses import LOSSES, ZERO_SUM, d_loss, g_loss
from .penalty import (
    METHODS,
    apply_penalty,
    apply_stage_penalties,
    generator_grad_sqnorm,
    penalty_grad,
    regulariser_grad,
)
from .regularisers import FIELD_PENALTIES, Penalty, due, penalty_specs

__all__ = [
    "ENGINES",
    "FIELD_PENALTIES",
    "LOSSES",
    "METHODS",
    "ZERO_SUM",
    "Penalty",
    "PenaltyTerm",
    "Stage",
    "StageResult",
    "apply_penalty",
    "apply_stage_penalties",
    "d_loss",
    "due",
    "g_loss",
    "game_gradients",
    "generator_grad_sqnorm",
    "penalty_grad",
    "penalty_specs",
    "regulariser_grad",
]
