"""The compiled csrc library (torch.ops.odegan_kernels.stage / .sqnorm / .ema_update, CPU and CUDA kernels).

Its sources are csrc/ at the top of the checkout, and the wheel carries them inside the package
(odegan_kernels/csrc/), so ``python -m odegan_kernels.ops.csrc build`` works in a checkout and from an installed
wheel alike. Loaded from, in order: $ODEGAN_CSRC_LIB; in a source
checkout, the CMake build (build-csrc/, skipped when older than the sources); the on-demand build, whose
folder and file are named by ``cache_key`` (a hash of the sources, torch, Python and the build flags), so a
library built from other sources or for another torch is never loaded. Importing never compiles: the
dispatch falls back with a one-line reason when the library is not there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import torch

from .utils import register_sqnorm_op

PACKAGE = Path(__file__).resolve().parents[1]
CHECKOUT = PACKAGE.parent  # a source checkout when it holds CMakeLists.txt


def _sources_folder() -> Path:
    """csrc/ at the top of a source checkout (or an unpacked sdist); in an installed wheel, odegan_kernels/csrc/."""
    top = CHECKOUT / "csrc"
    return top if (CHECKOUT / "CMakeLists.txt").is_file() and (top / "ops.cpp").is_file() else PACKAGE / "csrc"


CSRC = _sources_folder()
CMAKE_LIB = CHECKOUT / "build-csrc" / "libodegan_kernels_csrc.so"
LIB_NAME = "odegan_kernels_csrc"
CPU_SOURCES = ("ops.cpp", "cpu/ops_cpu.cpp")
CUDA_SOURCES = ("cuda/ops_cuda.cu",)
SOURCE_SUFFIXES = (".cpp", ".cu", ".h")
_state: dict = {"loaded": None, "why": "not loaded yet", "registered": False}


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its warning about a missing CUDA runtime (not news on a CPU)."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _wheel_cuda_includes() -> list[str]:
    """The torch wheel's own CUDA headers (nvidia/cu13/include: cusparse.h and friends, which a bare toolkit may
    lack and torch's CUDA headers include), as CMakeLists.txt uses them."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(str(p) for d in nvidia.__path__ for p in Path(d).glob("cu[0-9]*/include") if p.is_dir())


def _build_args(with_cuda: bool) -> dict:
    """cpp_extension.load's sources and flags (CUDA kernels for sm_80 and sm_90 when with_cuda)."""
    cflags = ["-O3", "-std=c++17", "-fopenmp"]
    cuda_flags = ["-O3", "-std=c++17"]
    includes = _wheel_cuda_includes() if with_cuda else []
    if with_cuda:
        cflags.append("-DODEGAN_WITH_CUDA")
        cuda_flags += [
            "-DODEGAN_WITH_CUDA",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
        ]
    sources = [str(CSRC / s) for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    return dict(
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags,
        extra_include_paths=includes,
        with_cuda=with_cuda,
    )


def sources() -> list[Path]:
    """Every C++/CUDA source and header under csrc/: what cache_key hashes and the wheel and sdist ship."""
    return sorted(f for f in CSRC.rglob("*") if f.suffix in SOURCE_SUFFIXES)


def cache_key(with_cuda: bool) -> str:
    """16 hex digits of a hash of every source file (its path in csrc/ and its contents), the torch, CUDA and
    Python versions and the build flags: what names the on-demand build's folder and library."""
    h = hashlib.sha256()
    for f in sources():
        data = f.read_bytes()
        h.update(f"{f.relative_to(CSRC).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    args = _build_args(with_cuda)
    env = (torch.__version__, torch.version.cuda, sys.implementation.cache_tag, with_cuda)
    h.update(repr((env, args["extra_cflags"], args["extra_cuda_cflags"], args["extra_include_paths"])).encode())
    return h.hexdigest()[:16]


def jit_library(with_cuda: bool) -> Path:
    """Where the on-demand build of these sources for this torch puts its library: a folder named by the cache
    key under $TORCH_EXTENSIONS_DIR, or torch's default extensions cache."""
    name = f"{LIB_NAME}_{cache_key(with_cuda)}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or _cpp_extension().get_default_build_root()
    return Path(root) / name / f"{name}.so"


def candidates() -> list[tuple[Path, str | None]]:
    """Every library load() may take, in the order it tries them, each with None when it is there to be tried
    or the reason it is passed over (not built; a CMake build older than the sources). Only the CMake build is
    checked by age: the on-demand builds are named by their sources' hash."""
    found: list[tuple[Path, bool]] = []
    if os.environ.get("ODEGAN_CSRC_LIB"):
        found.append((Path(os.environ["ODEGAN_CSRC_LIB"]), False))
    if (CHECKOUT / "CMakeLists.txt").is_file():
        found.append((CMAKE_LIB, True))
    # the CUDA build has the CPU kernels too
    found += [(jit_library(with_cuda), False) for with_cuda in (True, False)]
    out: list[tuple[Path, str | None]] = []
    newest_source = None
    for path, check_age in found:
        if not path.is_file():
            out.append((path, "not built"))
            continue
        if check_age:
            if newest_source is None:
                newest_source = max((f.stat().st_mtime for f in sources()), default=0.0)
            if path.stat().st_mtime < newest_source:
                out.append((path, f"older than {CSRC} (stale build, skipped)"))
                continue
        out.append((path, None))
    return out


def status() -> dict:
    """The loader's state: ``loaded`` (the library's path, "already registered", or None), ``why`` (None once
    loaded, else why not) and ``cuda_kernels`` (whether CUDA kernels are registered). Loads nothing."""
    loaded = _state["loaded"]
    return {
        "loaded": loaded,
        "why": None if loaded else _state["why"],
        "cuda_kernels": bool(loaded) and _has_cuda_kernel(),
    }


def _register_python_side() -> None:
    """Fake (meta) kernels for torch.compile and autograd for sqnorm (its backward is differentiable)."""
    if _state["registered"]:
        return

    @torch.library.register_fake("odegan_kernels::stage")
    def _(params, grads, x0, acc, coeffs, starts, reg_grad, write_x0):
        return None

    if _has_op("ema_update"):  # a library named by $ODEGAN_CSRC_LIB may predate the op

        @torch.library.register_fake("odegan_kernels::ema_update")
        def _(avg, params, decay_tensor, decay):
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
    for path, skip in candidates():
        if skip == "not built":
            continue
        if skip is not None:
            tried.append(f"{path}: {skip}")
            continue
        try:
            torch.ops.load_library(str(path))
            _state["loaded"] = str(path)
            _register_python_side()
            return True
        except Exception as exc:  # a mismatched build: say so, try the next one
            tried.append(f"{path.name}: {exc}")
    _state["why"] = (
        "csrc library not built for these sources and this torch (run `python -m odegan_kernels.ops.csrc build`, "
        "or in a checkout the CMake build csrc/build.sh)" + (f"; failed to load: {'; '.join(tried)}" if tried else "")
    )
    return False


def _has_op(name: str) -> bool:
    try:
        return getattr(torch.ops.odegan_kernels, name).default is not None
    except (AttributeError, RuntimeError):
        return False


def build(verbose: bool = False, with_cuda: bool | None = None) -> str:
    """Compile the sources with torch.utils.cpp_extension into jit_library() and load it; returns its path.
    Nothing is compiled when that library is already there and up to date."""
    cpp_extension = _cpp_extension()
    if with_cuda is None:
        with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and torch.cuda.is_available()
    lib = jit_library(with_cuda)
    lib.parent.mkdir(parents=True, exist_ok=True)
    if shutil.which("ninja") is None:  # cpp_extension runs ninja from PATH; a venv not activated lacks it there
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass  # cpp_extension says ninja is required
    cpp_extension.load(
        name=lib.stem,
        build_directory=str(lib.parent),
        is_python_module=False,
        verbose=verbose,
        **_build_args(with_cuda),
    )
    _state["loaded"] = str(lib)
    _register_python_side()
    return str(lib)


def available() -> tuple[bool, str]:
    ok = load()
    return (True, "") if ok else (False, _state["why"])


def supports(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    return device.type == "cuda" and _has_cuda_kernel()


def _has_cuda_kernel() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("odegan_kernels::stage", "CUDA")


def stage(params, grads, x0, acc, coeffs, segments, reg_grad=None, write_x0=False):
    torch.ops.odegan_kernels.stage(params, grads, x0, acc, coeffs, [s for s, _ in segments], reg_grad, write_x0)


def ema_update(avg, params, decay):
    if isinstance(decay, torch.Tensor):
        torch.ops.odegan_kernels.ema_update(avg, params, decay, 0.0)
    else:
        torch.ops.odegan_kernels.ema_update(avg, params, None, decay)


def sqnorm(tensors):
    return torch.ops.odegan_kernels.sqnorm(list(tensors))


def main(argv: list[str] | None = None) -> int:
    """``python -m odegan_kernels.ops.csrc build``: compile the library (verbose) and print where it is."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["build"]:
        print("usage: python -m odegan_kernels.ops.csrc build", file=sys.stderr)
        return 2
    print(build(verbose=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
