"""``python -m odegan_kernels`` is the ``odegan`` command (works before the console script is on PATH)."""

import sys

from .cli import main

sys.exit(main())
