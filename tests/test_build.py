"""How the csrc library is built and found: the ahead-of-time CMake build (CPU kernels built and checked, CUDA
sources compiled with nvcc), and the loader's choice among builds (the on-demand build's cache is keyed by
the sources, torch and the flags; the CMake build must be newer than the sources)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from odegan_kernels.ops import csrc

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import torch, odegan_kernels.ops as ops
from odegan_kernels.ops import csrc, reference
assert csrc.load(), csrc.status()
assert csrc.status()["loaded"] == __import__("os").environ["ODEGAN_CSRC_LIB"], csrc.status()
gen = torch.Generator().manual_seed(0)
n = 10007
g, x0, acc = (torch.randn(n, generator=gen) for _ in range(3))
coeffs = torch.randn(2, 5, generator=gen)
reg = torch.randn(4000, generator=gen)
want = [torch.full((n,), float("nan")), acc.clone(), x0.clone()]
reference.stage(want[0], g, want[2], want[1], coeffs, [(0, 3001), (3001, n)], reg_grad=reg, write_x0=True)
got = [torch.full((n,), float("nan")), acc.clone(), x0.clone()]
ops.rk_stage(got[0], g, got[2], got[1], coeffs, [(0, 3001), (3001, n)], reg_grad=reg, write_x0=True, backend="csrc")
for a, b in zip(got, want):
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6) and not a.isnan().any()
ts = [torch.randn(70000, generator=gen), torch.randn(3, generator=gen)]
assert torch.allclose(ops.sqnorm(ts, backend="csrc"), sum(t.double().square().sum() for t in ts).float())
for decay in (0.999, torch.tensor(0.3)):
    avg, params = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    want = avg.clone()
    reference.ema_update(want, params, decay)
    ops.ema_update(avg, params, decay, backend="csrc")
    assert torch.allclose(avg, want, rtol=1e-6, atol=1e-6) and not avg.isnan().any()
print("CUDA kernels registered:", csrc.status()["cuda_kernels"])
"""


def _build(tmp_path, *args):
    env = {**os.environ, "BUILD_DIR": str(tmp_path / "build"), "PYTHON": sys.executable}
    res = subprocess.run(
        ["bash", str(csrc.CSRC / "build.sh"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lib = tmp_path / "build" / "libodegan_kernels_csrc.so"
    assert lib.is_file()
    check = subprocess.run(
        [sys.executable, "-c", CHECK],
        env={**os.environ, "ODEGAN_CSRC_LIB": str(lib)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    return check.stdout


needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found (pip install cmake)")


@pytest.mark.slow
@needs_cmake
def test_cmake_build_cpu_kernels(tmp_path):
    assert "CUDA kernels registered: False" in _build(tmp_path)


@pytest.mark.slow
@needs_cmake
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA sources cannot be compiled here")
def test_cmake_build_with_cuda_kernels(tmp_path):
    """nvcc compiles csrc/cuda for sm_80 and sm_90 and the library links: CUDA code that does not compile
    fails here. (Running it needs a GPU: bench/gpu_check.sh.)"""
    assert "CUDA kernels registered: True" in _build(tmp_path, "--cuda")
    sass = _sass(tmp_path / "build" / "libodegan_kernels_csrc.so")
    if sass is not None:  # Triton's package carries cuobjdump
        assert "sm_90" in sass
        stage = sass[sass.index("stage_vec4_kernel") :]
        stage = stage[: stage.find("Function :", 10)]
        assert "LDG.E.128" in stage and "STG.E.128" in stage, "the float4 stage kernel lost its 16-byte accesses"
        for scalar in ("float", "double"):  # ema_vec_kernel<float> and <double>: float4 / double2 accesses
            ema = _function(sass, f"ema_vec_kernel<{scalar}>", f"ema_vec_kernelI{scalar[0]}E")
            assert "LDG.E.128" in ema and "STG.E.128" in ema, f"ema_vec_kernel<{scalar}> lost its 16-byte accesses"
            for table in (32, 1024):  # sqnorm's grid-stride kernel, both table sizes: 16-byte loads where aligned
                sq = _function(
                    sass, f"sqnorm_partial_kernel<{scalar}, {table}>", f"sqnorm_partial_kernelI{scalar[0]}Li{table}E"
                )
                assert "LDG.E.128" in sq, f"sqnorm_partial_kernel<{scalar}, {table}> lost its 16-byte loads"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA sources cannot be compiled here")
def test_on_demand_build_with_cuda_kernels(tmp_path):
    """python -m odegan_kernels.ops.csrc build's route with CUDA (what a GPU machine with an installed wheel
    takes): compiles, links and registers the CUDA kernels. CUDA_HOME names the toolkit behind nvcc."""
    dry = subprocess.run(
        ["nvcc", "-dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"], capture_output=True, text=True
    )
    here = [line.split("=", 1)[1] for line in dry.stderr.splitlines() if line.startswith("#$ _HERE_=")]
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    if here:
        env["CUDA_HOME"] = str(Path(here[0]).parent)
    code = (
        "from odegan_kernels.ops import csrc; print(csrc.build(with_cuda=True)); "
        "print('CUDA kernels registered:', csrc.status()['cuda_kernels'])"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "CUDA kernels registered: True" in res.stdout and str(tmp_path) in res.stdout


def _function(sass: str, *names: str) -> str:
    """The SASS of the first function whose header names one of ``names`` (demangled or mangled)."""
    for part in sass.split("Function :")[1:]:
        if any(name in part.splitlines()[0] for name in names):
            return part
    raise AssertionError(f"no function {names} in the SASS")


def _sass(lib: Path) -> str | None:
    try:
        import triton
    except ImportError:
        return None
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.is_file():
        return None
    res = subprocess.run([str(tool), "--dump-sass", str(lib)], capture_output=True, text=True, timeout=120)
    return res.stdout if res.returncode == 0 else None


# -- which library the loader takes ----------------------------------------------------------------------
@pytest.fixture
def loader(monkeypatch, tmp_path):
    """csrc's list of libraries to try over a copy of the sources (to edit), its own extensions cache and CMake
    build path; returns the copy and a function giving the libraries load() would try, in order."""
    src = tmp_path / "csrc"
    shutil.copytree(csrc.CSRC, src)
    monkeypatch.setattr(csrc, "CSRC", src)
    monkeypatch.setattr(csrc, "CMAKE_LIB", tmp_path / "build-csrc" / "libodegan_kernels_csrc.so")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    monkeypatch.delenv("ODEGAN_CSRC_LIB", raising=False)

    def tried() -> list[str]:
        return [str(path) for path, skip in csrc.candidates() if skip is None]

    return src, tried


def _fake_library(path: Path, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"a library")
    os.utime(path, None if mtime is None else (mtime, mtime))
    return path


def _skipped(path: Path) -> str | None:
    return dict(csrc.candidates())[path]


def test_a_cached_build_of_other_sources_is_not_loaded(loader):
    src, tried = loader
    assert tried() == [] and _skipped(csrc.jit_library(with_cuda=False)) == "not built"
    # A build of exactly these sources is taken whatever its age: an installed wheel's files are newer than
    # a library built before from the same sources.
    built = _fake_library(csrc.jit_library(with_cuda=False), mtime=1)
    assert tried() == [str(built)]
    # Edit a source: its key changes, so the library built before is left alone even though it is newer.
    cpu = src / "cpu" / "ops_cpu.cpp"
    cpu.write_text(cpu.read_text() + "\n// edited\n")
    os.utime(built, (time.time() + 3600,) * 2)
    assert csrc.jit_library(with_cuda=False) != built
    assert tried() == []
    rebuilt = _fake_library(csrc.jit_library(with_cuda=False))
    assert tried() == [str(rebuilt)]


def test_cache_key_covers_sources_torch_python_and_flags(loader, monkeypatch, tmp_path):
    src, _ = loader
    key = csrc.cache_key(with_cuda=False)
    assert len(key) == 16 and csrc.cache_key(with_cuda=False) == key
    assert csrc.jit_library(with_cuda=False).name == f"odegan_kernels_csrc_{key}.so"
    assert csrc.cache_key(with_cuda=True) != key  # other sources and flags
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", torch.__version__ + ".other")
        assert csrc.cache_key(with_cuda=False) != key
    with monkeypatch.context() as m:
        m.setattr(sys.implementation, "cache_tag", "cpython-299")
        assert csrc.cache_key(with_cuda=False) != key
    # The same sources elsewhere (a checkout, an installed wheel) share one build; one more file does not.
    elsewhere = Path(shutil.copytree(src, tmp_path / "elsewhere"))
    monkeypatch.setattr(csrc, "CSRC", elsewhere)
    assert csrc.cache_key(with_cuda=False) == key
    (elsewhere / "cuda" / "extra.h").write_text("// a new header\n")
    assert csrc.cache_key(with_cuda=False) != key


def test_loader_order_and_the_cmake_build_age_check(loader, monkeypatch, tmp_path):
    _, tried = loader
    jit = _fake_library(csrc.jit_library(with_cuda=False))
    cmake = _fake_library(csrc.CMAKE_LIB, mtime=1)  # older than every source: a stale build
    assert tried() == [str(jit)] and "stale build, skipped" in _skipped(cmake)
    jit.unlink()
    assert tried() == []
    os.utime(cmake, None)  # newer than the sources: the CMake build comes before the on-demand one
    _fake_library(csrc.jit_library(with_cuda=False))
    assert tried() == [str(cmake), str(jit)]
    explicit = _fake_library(tmp_path / "mine.so", mtime=1)  # $ODEGAN_CSRC_LIB: taken as it is, first
    monkeypatch.setenv("ODEGAN_CSRC_LIB", str(explicit))
    assert tried() == [str(explicit), str(cmake), str(jit)]


LOAD = r"""
import json, sys
from pathlib import Path
from odegan_kernels.ops import csrc
csrc.CMAKE_LIB = Path(sys.argv[1])  # no CMake build
ok = csrc.load()
print(json.dumps({"ok": ok, **csrc.status()}))
"""


def _load_in_a_fresh_process(tmp_path, cmake_lib=None, **env) -> dict:
    """csrc.load() in a new interpreter with ``env``, the CMake build taken to be ``cmake_lib`` (default none)."""
    import json

    env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    res = subprocess.run(
        [sys.executable, "-c", LOAD, str(cmake_lib or tmp_path / "no-cmake-build.so")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_load_says_what_it_could_not_load_and_takes_the_next(tmp_path):
    """A file that is no library (a mismatched build) is named in the reason, and the next candidate loads."""
    bad = _fake_library(tmp_path / "broken.so")
    empty_cache = str(tmp_path / "torch_extensions")
    got = _load_in_a_fresh_process(tmp_path, ODEGAN_CSRC_LIB=str(bad), TORCH_EXTENSIONS_DIR=empty_cache)
    assert got["ok"] is False and got["loaded"] is None
    assert "broken.so" in got["why"] and "failed to load" in got["why"] and "csrc build" in got["why"]
    # the library this session uses (conftest built it) comes next when the cache is the real one
    real = csrc.status()["loaded"]
    assert real and Path(real).is_file()
    if real in (str(csrc.jit_library(with_cuda=True)), str(csrc.jit_library(with_cuda=False))):
        cache, cmake = str(Path(real).parents[1]), None  # an on-demand build: the cache it lives in
    else:  # a CMake build (bench/gpu_check.sh's): the candidate right after ODEGAN_CSRC_LIB
        cache, cmake = empty_cache, real
    got = _load_in_a_fresh_process(tmp_path, cmake_lib=cmake, ODEGAN_CSRC_LIB=str(bad), TORCH_EXTENSIONS_DIR=cache)
    assert got == {"ok": True, "loaded": real, "why": None, "cuda_kernels": csrc.status()["cuda_kernels"]}


def test_loader_never_looks_in_setuptools_build_folder(monkeypatch):
    """pip wheel . and python -m build write build/ into the checkout: no library is looked for there."""
    monkeypatch.delenv("ODEGAN_CSRC_LIB", raising=False)
    paths = [path for path, _ in csrc.candidates()]
    assert csrc.CHECKOUT / "build-csrc" / "libodegan_kernels_csrc.so" in paths
    assert not [p for p in paths if csrc.CHECKOUT / "build" in p.parents], paths
