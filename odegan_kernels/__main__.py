"""``python -m odegan_kernels`` is the ``odegan`` command (works before the console script is on PATH)."""

from .cli import console

console()
