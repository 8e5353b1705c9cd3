"""The game: losses, the players' gradients (autograd, or hand-derived for MLP pairs), and the penalties."""

from .autograd import ENGINES, game_gradients
from .contract import Stage, StageResult
from .losses import LOSSES, ZERO_SUM, d_loss, g_loss
from .penalty import METHODS, apply_penalty, generator_grad_sqnorm, penalty_grad, regulariser_grad

__all__ = [
    "ENGINES",
    "LOSSES",
    "METHODS",
    "ZERO_SUM",
    "Stage",
    "StageResult",
    "apply_penalty",
    "d_loss",
    "g_loss",
    "game_gradients",
    "generator_grad_sqnorm",
    "penalty_grad",
    "regulariser_grad",
]
