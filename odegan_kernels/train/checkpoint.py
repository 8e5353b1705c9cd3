"""Checkpoint files: written atomically, so a crash never leaves a torn one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over the target.

    A crash at any point leaves either the old checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: Path, device) -> dict:
    """A checkpoint written by atomic_save, with its tensors on ``device``."""
    return torch.load(path, map_location=device, weights_only=False)
