"""The integrator: Butcher tableaus, step-size schedules and the ODE-GAN stepper."""

from ..game.contract import Stage
from .schedules import SCHEDULES, cifar_schedule, constant
from .stepper import COUPLINGS, PENALTY_PLACEMENTS, ODEStepper
from .tableau import TABLEAUS, StageCoeffs, Tableau, compile_tableau, get_tableau

__all__ = [
    "COUPLINGS",
    "PENALTY_PLACEMENTS",
    "ODEStepper",
    "SCHEDULES",
    "Stage",
    "StageCoeffs",
    "TABLEAUS",
    "Tableau",
    "cifar_schedule",
    "compile_tableau",
    "constant",
    "get_tableau",
]
