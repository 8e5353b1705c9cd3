"""Deprecated: the "cuda" backend is now "csrc" (odegan_kernels.ops.csrc); this name stays as an alias.

``from odegan_kernels.ops import cuda`` gives the csrc module itself, and
``python -m odegan_kernels.ops.cuda build`` still builds it; both warn. Delete once nothing uses the old name.
"""

import sys
import warnings

from . import csrc as _csrc

warnings.warn("odegan_kernels.ops.cuda is deprecated: use odegan_kernels.ops.csrc", DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    raise SystemExit(_csrc.main())
sys.modules[__name__] = _csrc
