"""Checkpoint files and the run folder: atomic writes that keep the previous checkpoint, loading that runs no
code from the file, and a lock so two runs never share one folder."""

from __future__ import annotations

import os
import pickle
import stat
import tempfile
import warnings
from pathlib import Path

import torch

from ..files import UnsafeFileError, open_regular

CHECKPOINT, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"


class CheckpointError(RuntimeError):
    """A checkpoint (or the run folder) cannot be used; the message names the file and what to do."""


def atomic_save(obj, path: Path, previous: Path | None = None) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over the target.

    A crash at any point leaves either the old checkpoint or the new one, never a torn file. With
    ``previous``, the file being replaced is first renamed there, so the last two checkpoints are kept.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint(path: Path, device="cpu") -> dict:
    """A checkpoint's contents, with its tensors on ``device``.

    Loaded with ``weights_only=True``: a file that holds anything but tensors and plain containers (a pickled
    object that could run code when loaded) is refused, as are empty, truncated or corrupt files.
    """
    path = Path(path)
    try:
        with open_regular(path) as f, warnings.catch_warnings():  # a FIFO is refused, never waited on
            warnings.simplefilter("ignore")  # a damaged file can also trip the unpickler's protocol warning
            state = torch.load(f, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except UnsafeFileError as exc:
        raise CheckpointError(str(exc)) from None
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):  # an object that names code to run
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain containers; it was refused because "
                "loading it could run code. Delete or move it if you did not write it"
            ) from None
        raise CheckpointError(f"{path} is corrupt ({_first_line(exc)}); delete or move it") from None
    except Exception as exc:  # anything a damaged file makes the unpickler raise (EOFError, struct.error, ...)
        raise CheckpointError(
            f"{path} is empty, truncated or corrupt ({_first_line(exc)}); delete or move it"
        ) from None
    if not isinstance(state, dict) or ("run" not in state and "step" not in state):
        raise CheckpointError(f"{path} is not an odegan checkpoint (no 'run', nor 0.2's 'step'); delete or move it")
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_latest(out: Path, device="cpu") -> tuple[dict, Path] | None:
    """The newest readable checkpoint in a run folder and its path (None when there is none). When the newest
    is unreadable the previous one is used, with a warning naming both."""
    out = Path(out)
    newest, previous = out / CHECKPOINT, out / PREVIOUS
    if not newest.exists() and not previous.exists():
        return None
    try:
        return read_checkpoint(newest, device), newest
    except (CheckpointError, FileNotFoundError) as exc:
        if not previous.exists():
            if isinstance(exc, FileNotFoundError):
                return None
            raise
        try:
            state = read_checkpoint(previous, device)
        except CheckpointError as exc2:
            raise CheckpointError(f"no usable checkpoint in {out}: {exc}; and {exc2}") from None
        why = "is missing" if isinstance(exc, FileNotFoundError) else f"is unusable ({exc})"
        warnings.warn(f"{newest} {why}: resuming from the previous checkpoint {previous}", stacklevel=2)
        return state, previous


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete temporaries that a killed write left behind (the run folder is locked by now)."""
    patterns = (CHECKPOINT + ".*.tmp", PREVIOUS + ".*.tmp", "metrics.jsonl.tmp")
    stale = [p for pattern in patterns for p in Path(out).glob(pattern)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


RUN_FILES = (CHECKPOINT, PREVIOUS, "config.json", "metrics.jsonl", "metrics.png", "summary.json", "trajectory.png")


def set_aside(out: Path) -> Path | None:
    """Move an earlier run's files out of the way (into ``out/replaced-<time>/``) before a fresh run writes
    there, so nothing of it mixes with the new run and nothing is lost; the folder used, or None."""
    out = Path(out)
    found = [out / n for n in RUN_FILES if (out / n).exists()] + sorted(out.glob("samples_*.png"))
    found += [out / "tensorboard"] if (out / "tensorboard").is_dir() else []
    if not found:
        return None
    import time

    dest = out / time.strftime("replaced-%Y%m%d-%H%M%S")
    n = 0
    while dest.exists():
        n += 1
        dest = out / time.strftime(f"replaced-%Y%m%d-%H%M%S-{n}")
    dest.mkdir()
    for path in found:
        os.replace(path, dest / path.name)
    return dest


class RunLock:
    """An exclusive lock on a run folder (``.lock``, held with flock for the life of the process): a second
    run on the same folder is refused with the other process's id instead of interleaving its files."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        try:  # never through a link: a planted .lock -> some file would have that file truncated
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if self.path.is_symlink():
                raise CheckpointError(
                    f"{self.path} is a symbolic link; a run's lock is its own regular file: remove the link"
                ) from None
            raise exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CheckpointError(f"{self.path} is not a regular file; a run's lock is its own: move it away")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"run folder {self.path.parent} is in use by another run (process {other}); wait for it to end, "
                "or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
