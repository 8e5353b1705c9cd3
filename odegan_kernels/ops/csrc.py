"""The compiled csrc library (torch.ops.odegan_kernels.stage / .sqnorm, CPU and CUDA kernels).

Loaded from, in order: $ODEGAN_CSRC_LIB; the CMake build (build/libodegan_kernels_csrc.so); an earlier
on-demand build. ``build()`` compiles it with torch.utils.cpp_extension (CUDA sources only where torch
has CUDA and nvcc is found). Importing never compiles: pip install stays pure Python, and the dispatch
falls back with a one-line reason when the library is not there.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .utils import register_sqnorm_op

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
LIB_NAME = "odegan_kernels_csrc"
_state: dict = {"loaded": None, "why": "not loaded yet", "registered": False}


def _candidates() -> list[Path]:
    out = []
    if os.environ.get("ODEGAN_CSRC_LIB"):
        out.append(Path(os.environ["ODEGAN_CSRC_LIB"]))
    out.append(ROOT / "build" / f"lib{LIB_NAME}.so")
    import logging

    # importing cpp_extension warns about a missing CUDA runtime on CPU machines: not news here
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import _get_build_directory
    finally:
        log.setLevel(level)

    try:
        out.append(Path(_get_build_directory(LIB_NAME, verbose=False)) / f"{LIB_NAME}.so")
    except Exception:
        pass
    return out


def _register_python_side() -> None:
    """Fake (meta) kernels for torch.compile and autograd for sqnorm (its backward is differentiable)."""
    if _state["registered"]:
        return

    @torch.library.register_fake("odegan_kernels::stage")
    def _(params, grads, x0, acc, coeffs, starts, reg, write_x0):
        return None

    register_sqnorm_op("odegan_kernels::sqnorm")
    _state["registered"] = True


def load() -> bool:
    if _state["loaded"]:
        return True
    if hasattr(torch.ops.odegan_kernels, "stage") and _has_op("stage"):
        _state["loaded"] = "already registered"
        _register_python_side()
        return True
    tried = []
    explicit = os.environ.get("ODEGAN_CSRC_LIB")
    newest_source = max((f.stat().st_mtime for f in CSRC.rglob("*") if f.suffix in (".cpp", ".cu", ".h")), default=0.0)
    for path in _candidates():
        if path.is_file() and str(path) != explicit and path.stat().st_mtime < newest_source:
            tried.append(f"{path.name}: older than csrc/ (stale build, skipped)")
            continue
        if path.is_file():
            try:
                torch.ops.load_library(str(path))
                _state["loaded"] = str(path)
                _register_python_side()
                return True
            except Exception as exc:  # a stale or mismatched build: say so, try the next one
                tried.append(f"{path.name}: {exc}")
    _state["why"] = (
        "csrc library not built (run `python -m odegan_kernels.ops.csrc build` or the CMake "
        "build in csrc/)" + (f"; failed to load: {'; '.join(tried)}" if tried else "")
    )
    return False


def _has_op(name: str) -> bool:
    try:
        return getattr(torch.ops.odegan_kernels, name).default is not None
    except (AttributeError, RuntimeError):
        return False


def build(verbose: bool = False, with_cuda: bool | None = None) -> str:
    """Compile csrc with torch.utils.cpp_extension and load it; returns the library's path."""
    from torch.utils import cpp_extension

    if with_cuda is None:
        with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and torch.cuda.is_available()
    sources = [str(CSRC / "ops.cpp"), str(CSRC / "cpu" / "ops_cpu.cpp")]
    cflags = ["-O3", "-std=c++17", "-fopenmp"]
    cuda_flags = ["-O3", "-std=c++17"]
    if with_cuda:
        sources.append(str(CSRC / "cuda" / "ops_cuda.cu"))
        cflags.append("-DODEGAN_WITH_CUDA")
        cuda_flags += [
            "-DODEGAN_WITH_CUDA",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
        ]
    cpp_extension.load(
        name=LIB_NAME,
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags,
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
    _state["loaded"] = "built by cpp_extension"
    _register_python_side()
    return _state["loaded"]


def available() -> tuple[bool, str]:
    ok = load()
    return (True, "") if ok else (False, _state["why"])


def supports(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    return device.type == "cuda" and _has_cuda_kernel()


def _has_cuda_kernel() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("odegan_kernels::stage", "CUDA")


def stage(params, grads, x0, acc, coeffs, segments, reg=None, write_x0=False):
    torch.ops.odegan_kernels.stage(params, grads, x0, acc, coeffs, [s for s, _ in segments], reg, write_x0)


def sqnorm(tensors):
    return torch.ops.odegan_kernels.sqnorm(list(tensors))


def main(argv: list[str] | None = None) -> int:
    """``python -m odegan_kernels.ops.csrc build``: compile the library (verbose) and print where it is."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv != ["build"]:
        print("usage: python -m odegan_kernels.ops.csrc build", file=sys.stderr)
        return 2
    print(build(verbose=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
