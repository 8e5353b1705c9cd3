"""The game: losses, the players' gradients (through autograd, or hand-derived for MLP pairs) fed by a Batch, and
the penalties' definitions (g_reg's three methods in g_reg.py)."""

from .autograd import AutogradEngine
from .batch import Batch
from .engine import ENGINES, choose_engine, game_gradients
from .g_reg import METHODS, g_reg_grad
from .losses import LOSSES, ZERO_SUM, Squeeze, d_loss, g_loss
from .mlp import MLPPair
from .penalties import consensus_penalty, generator_grad_sqnorm, input_grad_penalty, wgan_gp_penalty
from .population import PopulationAutograd, PopulationMLP

__all__ = [
    "AutogradEngine",
    "Batch",
    "ENGINES",
    "LOSSES",
    "METHODS",
    "MLPPair",
    "PopulationAutograd",
    "PopulationMLP",
    "Squeeze",
    "ZERO_SUM",
    "choose_engine",
    "consensus_penalty",
    "d_loss",
    "g_loss",
    "g_reg_grad",
    "game_gradients",
    "generator_grad_sqnorm",
    "input_grad_penalty",
    "wgan_gp_penalty",
]
