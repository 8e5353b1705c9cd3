"""What the package's torch.compile calls set up in Inductor first: ``torch_compile(fn, **kwargs)`` is torch.compile
with the CPU vector-ISA probe remembered on disk.

Inductor (CPU) picks the vector instructions its C++ may use by building a small probe per candidate ISA and loading
each in a fresh Python that imports torch (torch/_inductor/cpu_vec_isa.py, ``VecISA.check_build``), once per process:
three imports of torch, 16.5 s on this project's 2-core machines, paid by every process that compiles for the CPU
however warm its compile cache is (pytorch/pytorch#140970; measured in docs/RESULTS.md). Its answer depends on the
compiler, torch and the CPU, so it is kept in a small JSON file in Inductor's cache folder under a key of those
(``vec-isa-<key>.json``: the names of the ISAs that passed, data only) and read back by the next process, which then
skips the probe. A file that is missing, unreadable, or names an ISA this torch does not know is ignored and the probe
runs as before. ``torch._inductor.config.cpp.vec_isa_ok`` set by the user (or TORCHINDUCTOR_VEC_ISA_OK) is their
answer, and nothing is remembered then. A probe that failed for a passing reason (a load that timed out) is
remembered as failed too: delete the file to probe again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import sys
from pathlib import Path

import torch

from .files import open_regular, write_file

_STATE: dict = {}


def torch_compile(fn, **kwargs):
    """``torch.compile(fn, **kwargs)``, the vector-ISA probe remembered first (remember_vec_isa)."""
    remember_vec_isa()
    return torch.compile(fn, **kwargs)


def memo_path() -> Path | None:
    """The file that holds this machine's probe answer (None where Inductor's CPU probe is not there to remember)."""
    try:
        from torch._inductor import config
        from torch._inductor import cpu_vec_isa as isa
        from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:
        return None
    if config.cpp.vec_isa_ok is not None or not hasattr(isa, "valid_vec_isa_list"):
        return None
    try:
        cpu = sorted(isa.x86_isa_checker()) if platform.machine() in ("x86_64", "AMD64") else []
        compiler = get_compiler_version_info(get_cpp_compiler())
    except Exception:  # no C++ compiler: Inductor says so itself, in its own words
        return None
    key = json.dumps(
        [
            torch.__version__,
            torch.version.git_version,
            sys.executable,
            sys.platform,
            platform.machine(),
            torch.backends.cpu.get_cpu_capability(),
            cpu,
            compiler,
            [(str(v), v._arch_flags) for v in isa.supported_vec_isa_list],
        ]
    )
    return Path(cache_dir()) / f"vec-isa-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _read(path: Path, known: dict) -> list | None:
    try:
        with open_regular(path) as f:
            names = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) and n in known for n in names):
        return None
    return [known[n] for n in names]


def remembered(probe, path: Path, known: dict):
    """``probe`` (a function returning the VecISA objects that passed) answered from ``path`` where that file holds
    a list of names all in ``known`` ({name: VecISA}); otherwise probed, and the answer written there (atomically;
    a folder that cannot be written is left as it is, and the next process probes again)."""

    @functools.cache
    def answer():
        got = _read(path, known)
        if got is not None:
            return got
        got = probe()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(path, json.dumps([str(v) for v in got]) + "\n")
        except OSError:
            pass
        return got

    return answer


def remember_vec_isa() -> Path | None:
    """Install the remembered probe into Inductor, once per process; the file it reads and writes, or None where
    there is nothing to remember (no Inductor CPU probe, no C++ compiler, or the user's own vec_isa_ok)."""
    if "installed" in _STATE:
        return _STATE["installed"]
    path = _STATE["installed"] = memo_path()
    if path is None:
        return None
    from torch._inductor import config
    from torch._inductor import cpu_vec_isa as isa

    probe = isa.valid_vec_isa_list
    answer = remembered(probe, path, {str(v): v for v in isa.supported_vec_isa_list})

    def valid_vec_isa_list():
        return probe() if config.cpp.vec_isa_ok is not None else answer()  # set since: the user's answer

    isa.valid_vec_isa_list = valid_vec_isa_list
    return path
