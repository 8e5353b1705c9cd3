"""odegan-kernels: fused kernels and a complete trainer for ODE-GAN (Qin et al., NeurIPS 2020)."""

from . import ops
from .contract import Penalty, PenaltyTerm, Stage, StageResult
from .flat import FlatParams
from .game import Batch, d_loss, g_loss, game_gradients, generator_grad_sqnorm
from .ode import TABLEAUS, ODEStepper, Tableau, compile_tableau

__version__ = "0.3.0"

__all__ = [
    "Batch",
    "FlatParams",
    "ODEStepper",
    "Penalty",
    "PenaltyTerm",
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
    "__version__",
]
