"""The trainer: options and presets, checkpoints, logging, divergence recovery, and the training loop."""

from .checkpoint import CheckpointError, RunLock, atomic_save, load_latest, read_checkpoint
from .config import PRESETS, Config, load_config, make_config, resolve_device
from .logging import plot_metrics
from .loop import Trainer
from .state import NonFiniteError, TrainingInterrupted

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Config",
    "NonFiniteError",
    "RunLock",
    "Trainer",
    "TrainingInterrupted",
    "atomic_save",
    "load_config",
    "load_latest",
    "make_config",
    "plot_metrics",
    "read_checkpoint",
    "resolve_device",
]
