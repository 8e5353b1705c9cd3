"""The trainer: options and presets, checkpoints, logging, and the training loop."""

from .checkpoint import atomic_save, load_checkpoint
from .config import PRESETS, Config, make_config, resolve_device
from .logging import plot_metrics
from .loop import NonFiniteError, Trainer

__all__ = [
    "PRESETS",
    "Config",
    "NonFiniteError",
    "Trainer",
    "atomic_save",
    "load_checkpoint",
    "make_config",
    "plot_metrics",
    "resolve_device",
]
