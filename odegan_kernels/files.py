"""How the package writes and reads a run's files: writes never follow a symbolic link planted at the destination
(a file is written beside it and renamed over it, or appended to only when it is a regular file), and reads take
only regular files (a FIFO would hang the reader). Nothing a user wrote elsewhere is touched through a link."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class UnsafeFileError(OSError):
    """A run file that is not a regular file (a symbolic link, a FIFO, a folder): the message names it."""


def _refuse(path: Path, what: str) -> None:
    raise UnsafeFileError(
        f"{path} is {what}, not a regular file: a run reads and writes only its own regular files; move it away"
    )


def write_file(path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` whole: into a temporary file beside it, then renamed over it (a crash leaves the
    old file or the new one; a link at ``path`` is replaced, never followed)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        _refuse(path, "a folder")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_line(path, line: str) -> None:
    """Append one line to ``path`` (created if missing), refusing a link or anything but a regular file there."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if path.is_symlink():
            _refuse(path, "a symbolic link")
        raise exc
    with os.fdopen(fd, "a") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            _refuse(path, "a special file")
        f.write(line if line.endswith("\n") else line + "\n")


def save_figure(fig, path, **kwargs) -> None:
    """matplotlib's ``fig.savefig(path, **kwargs)``, written as write_file writes (never through a link)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or None, **kwargs)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def open_regular(path, flags: int = os.O_RDONLY):
    """``path`` opened for reading as a binary file object, if it is a regular file (links to one are followed);
    anything else (a FIFO, a device, a folder) is refused without blocking on it."""
    path = Path(path)
    fd = os.open(path, flags | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a special file"
            _refuse(path, kind)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_lines(path) -> tuple[list[str], int]:
    """(the lines of a text file decoded as UTF-8, how many undecodable lines were skipped)."""
    with open_regular(path) as f:
        raw = f.read().split(b"\n")
    out, bad = [], 0
    for line in raw:
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            bad += 1
    return out, bad
