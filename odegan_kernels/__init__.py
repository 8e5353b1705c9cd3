"""odegan-kernels: fused kernels and a complete trainer for ODE-GAN (Qin et al., NeurIPS 2020)."""

from . import ops
from .flat import FlatParams
from .game import StageResult, d_loss, g_loss, game_gradients, generator_grad_sqnorm, regulariser_grad
from .ode import TABLEAUS, ODEStepper, Stage, Tableau, compile_tableau

__version__ = "0.2.1"

__all__ = [
    "FlatParams",
    "ODEStepper",
    "Stage",
    "StageResult",
    "Tableau",
    "TABLEAUS",
    "compile_tableau",
    "ops",
    "d_loss",
    "g_loss",
    "game_gradients",
    "generator_grad_sqnorm",
    "regulariser_grad",
    "__version__",
]
