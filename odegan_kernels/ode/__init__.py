"""The integrator: Butcher tableaus, step-size schedules and the ODE-GAN stepper."""

from .schedules import SCHEDULES, cifar_schedule, constant
from .stepper import COUPLINGS, REG_PLACEMENTS, ODEStepper
from .tableau import TABLEAUS, StageCoeffs, Tableau, compile_tableau, get_tableau

__all__ = [
    "COUPLINGS",
    "ODEStepper",
    "REG_PLACEMENTS",
    "SCHEDULES",
    "StageCoeffs",
    "TABLEAUS",
    "Tableau",
    "cifar_schedule",
    "compile_tableau",
    "constant",
    "get_tableau",
]
