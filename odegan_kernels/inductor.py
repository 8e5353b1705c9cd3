"""What the package's torch.compile calls set up in Inductor first: ``torch_compile(fn, **kwargs)`` is torch.compile
with the CPU vector-ISA probe's passes remembered on disk.

Inductor (CPU) picks the vector instructions its C++ may use by building a small probe per candidate ISA (and per
extension: VNNI, AVX512-BF16, AMX) and loading each in a fresh Python that imports torch
(torch/_inductor/cpu_vec_isa.py, ``VecISA.check_build``), in every process that compiles for the CPU however warm its
compile cache is: six such checks on this project's 2-core machines, 15-30 s (pytorch/pytorch#140970; measured in
docs/RESULTS.md). Only that build-and-load check is remembered: a pass is written as a small file in Inductor's cache
folder (``vec-isa-<key>.ok``, holding the line ``pass``), under a key taken when the check runs of what its outcome
is known to depend on: the probe's source; the ISA's class, name and flags at that moment (``_arch_flags`` and
``build_arch_flags()``); the C++ compiler Inductor would use then and its version text; torch's version, build and
location, and the size and time of its CPU library (an in-place rebuild); the Python executable; the environment
the compile and the loading child read (``ENV_KEYS``); the platform, the CPU's capability and flags. (Not the
child's whole ``sys.path``: it starts with the working folder, so every folder would check again; torch's location
stands for what the child imports.) A later check with the same key reads the file instead. Everything else is
Inductor's own code, run as it always runs: which ISAs the CPU's flags allow, their order, and what a check sets
(AVX512-BF16's flags, AMX's permission from the kernel). A failed check is not remembered (it may have failed for a
passing reason: the next process checks again); a file whose content is not exactly that line is not believed (the
check runs, and a pass replaces it; a folder at the path is left alone). ``torch._inductor.config.cpp.vec_isa_ok``
set by the user (or TORCHINDUCTOR_VEC_ISA_OK) is their answer: every check then runs as Inductor's own, nothing
read or written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import torch

from .files import open_regular, write_file

PASS = b"pass\n"
# what the probe's compile (the compiler, its headers and libraries) and the child that loads it (Inductor's
# python_subprocess_env: this environment, PYTHONPATH from TORCH_CUSTOM_PYTHONPATH) read from the environment
ENV_KEYS = (
    "TORCH_CUSTOM_PYTHONPATH",
    "PYTHONPATH",
    "PYTHONHOME",
    "LD_LIBRARY_PATH",
    "LD_PRELOAD",
    "LIBRARY_PATH",
    "CPATH",
    "C_INCLUDE_PATH",
    "CPLUS_INCLUDE_PATH",
    "CXX",
    "CC",
    "CFLAGS",
    "CXXFLAGS",
    "LDFLAGS",
)


def torch_compile(fn, **kwargs):
    """``torch.compile(fn, **kwargs)``, the vector-ISA probe's passes remembered first (remember_vec_isa)."""
    remember_vec_isa()
    return torch.compile(fn, **kwargs)


def memo_path(vec_isa, code: str) -> Path | None:
    """The file that remembers ``vec_isa.check_build(code)`` passing on this machine now (None where it cannot be
    told: no C++ compiler to name, no CPU flags to read, no cache folder to make)."""
    try:
        from torch._inductor import cpu_vec_isa as isa
        from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        cxx = get_cpp_compiler()
        compiler = get_compiler_version_info(cxx)
        cpu = sorted(isa.x86_isa_checker()) if platform.machine() in ("x86_64", "AMD64") else []
        folder = Path(cache_dir())
        flags = [vec_isa._arch_flags, vec_isa.build_arch_flags()]
        lib = Path(torch.__file__).parent / "lib"
        libs = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in lib.glob("libtorch_cpu*"))
    except Exception:  # Inductor's own check then says what is wrong, in its own words
        return None
    if not compiler:
        return None
    key = json.dumps(
        [
            code,
            type(vec_isa).__module__,
            type(vec_isa).__qualname__,
            str(vec_isa),
            flags,
            str(cxx),
            compiler,
            torch.__version__,
            torch.version.git_version,
            torch.__file__,
            libs,
            sys.executable,
            [(k, os.environ.get(k)) for k in ENV_KEYS],
            sys.platform,
            platform.machine(),
            torch.backends.cpu.get_cpu_capability(),
            cpu,
        ]
    )
    return folder / f"vec-isa-{hashlib.sha256(key.encode()).hexdigest()[:32]}.ok"


def _passed(path: Path) -> bool:
    try:
        with open_regular(path) as f:
            return f.read(len(PASS) + 1) == PASS
    except OSError:
        return False


def remembered(check):
    """``check`` (VecISA.check_build: (vec_isa, code) -> whether the probe built and loaded) answered True from its
    memo file where that holds exactly the line ``pass``; otherwise run, and a pass written there (atomically; a
    folder that cannot be written is left as it is, and the next process checks again)."""

    def check_build(vec_isa, code: str) -> bool:
        from torch._inductor import config

        if config.cpp.vec_isa_ok is not None:  # the user's answer: Inductor's own code, untouched
            return check(vec_isa, code)
        path = memo_path(vec_isa, code)
        if path is not None and _passed(path):
            return True
        ok = check(vec_isa, code)
        if ok and path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_file(path, PASS)
            except OSError:
                pass
        return ok

    check_build.unremembered = check
    return check_build


@functools.cache
def remember_vec_isa() -> bool:
    """Install the remembered check into Inductor, once per process; whether it is installed (False where this
    torch's Inductor has no such check to remember)."""
    try:
        from torch._inductor import cpu_vec_isa as isa
    except ImportError:
        return False
    check = getattr(getattr(isa, "VecISA", None), "check_build", None)
    if not callable(check):
        return False
    if not hasattr(check, "unremembered"):
        isa.VecISA.check_build = remembered(check)
    return True
