"""Studies that check the theory on problems with closed forms: DiracGAN (``odegan study dirac``)."""

from .dirac import Method, Run, closed_form, field, jacobian, methods, step_map_radius, trajectory
from .report import main, markdown, study

__all__ = [
    "Method",
    "Run",
    "closed_form",
    "field",
    "jacobian",
    "main",
    "markdown",
    "methods",
    "step_map_radius",
    "study",
    "trajectory",
]
