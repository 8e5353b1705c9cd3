"""The game: losses, the players' gradients (autograd, or hand-derived for MLP pairs), and the penalties."""

from .autograd import ENGINES, game_gradients
from .losses import LOSSES, ZERO_SUM, d_loss, g_loss
from .penalty import METHODS, generator_grad_sqnorm, penalty_grad, regulariser_grad

__all__ = [
    "ENGINES",
    "LOSSES",
    "METHODS",
    "ZERO_SUM",
    "d_loss",
    "g_loss",
    "game_gradients",
    "generator_grad_sqnorm",
    "penalty_grad",
    "regulariser_grad",
]
