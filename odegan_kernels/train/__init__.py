"""The trainer: options and presets, checkpoints, logging, divergence recovery, and the training loop."""

from .checkpoint import CheckpointError, RunLock, atomic_save, load_latest, read_checkpoint
from .config import PRESETS, Config, load_config, make_config, resolve_device
from .interrupts import TrainingInterrupted
from .legacy import migrate_checkpoint
from .logging import plot_metrics
from .loop import Trainer
from .recovery import NonFiniteError
from .state import RunState

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Config",
    "NonFiniteError",
    "RunLock",
    "RunState",
    "Trainer",
    "TrainingInterrupted",
    "atomic_save",
    "load_config",
    "load_latest",
    "make_config",
    "migrate_checkpoint",
    "plot_metrics",
    "read_checkpoint",
    "resolve_device",
]
