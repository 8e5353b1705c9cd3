"""The ahead-of-time CMake build of csrc/: CPU kernels built and checked, CUDA sources compiled (nvcc)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import torch, odegan_kernels.ops as ops
from odegan_kernels.ops import csrc, reference
assert csrc.load(), csrc._state
assert csrc._state["loaded"] == __import__("os").environ["ODEGAN_CSRC_LIB"], csrc._state
gen = torch.Generator().manual_seed(0)
n = 10007
g, x0, acc = (torch.randn(n, generator=gen) for _ in range(3))
coeffs = torch.randn(2, 5, generator=gen)
reg = torch.randn(4000, generator=gen)
want = [torch.full((n,), float("nan")), acc.clone(), x0.clone()]
reference.stage(want[0], g, want[2], want[1], coeffs, [(0, 3001), (3001, n)], reg=reg, write_x0=True)
got = [torch.full((n,), float("nan")), acc.clone(), x0.clone()]
ops.rk_stage(got[0], g, got[2], got[1], coeffs, [(0, 3001), (3001, n)], reg=reg, write_x0=True, backend="csrc")
for a, b in zip(got, want):
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6) and not a.isnan().any()
ts = [torch.randn(70000, generator=gen), torch.randn(3, generator=gen)]
assert torch.allclose(ops.sqnorm(ts, backend="csrc"), sum(t.double().square().sum() for t in ts).float())
print("CUDA kernels registered:", torch._C._dispatch_has_kernel_for_dispatch_key("odegan_kernels::stage", "CUDA"))
"""


def _build(tmp_path, *args):
    env = {**os.environ, "BUILD_DIR": str(tmp_path / "build"), "PYTHON": sys.executable}
    res = subprocess.run(
        ["bash", str(ROOT / "csrc" / "build.sh"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
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
