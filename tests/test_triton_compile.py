"""Compile every Triton kernel for sm_90 ahead of time, without a GPU.

The interpreter (how the other tests run Triton on a CPU) does not type-check like the compiler: it let
through a kernel that could never compile for a GPU. This test compiles the real thing with Triton's own
ptxas, in a subprocess (TRITON_INTERPRET is decided when triton is imported), and checks that the stage
kernel's hot path uses 16-byte vector accesses when pointers are aligned, as FlatParams guarantees.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton not installed")

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from odegan_kernels.ops import triton_kernels as tk

target = GPUTarget("cuda", 90, 32)
aligned = lambda n: {(i,): [["tt.divisibility", 16]] for i in range(n)}  # what a launch specialises on

def build(fn, sig, consts, attrs, warps=4):
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": warps}).asm["ptx"]

stage_sig = {"p_ptr": "*fp32", "g_ptr": "*fp32", "x0_ptr": "*fp32", "acc_ptr": "*fp32", "r_ptr": "*fp32",
             "coef_ptr": "*fp32", "seg_ptr": "*i64", "n": "i64", "r_len": "i64", "NSEG": "constexpr",
             "HAS_REG": "constexpr", "WRITE_X0": "constexpr", "BLOCK": "constexpr"}
for nseg in (1, 2, 5, tk.MAX_SEGMENTS):
    for has_reg in (False, True):
        for write in (False, True):
            for block, warps in ((1024, 4), (4096, 8)):
                consts = {"NSEG": nseg, "HAS_REG": has_reg, "WRITE_X0": write, "BLOCK": block}
                ptx = build(tk.KERNELS["stage"], stage_sig, consts, aligned(9), warps)
                assert "ld.global.v4" in ptx and "st.global.v4" in ptx, (nseg, has_reg, write, block)
                build(tk.KERNELS["stage"], stage_sig, consts, {})  # unaligned pointers compile too
for dt, f64 in (("fp32", False), ("fp64", True)):
    build(tk.KERNELS["sqnorm_partials"], {"addr_ptr": "*i64", "len_ptr": "*i64", "part_ptr": "*" + dt,
          "IS_F64": "constexpr", "BLOCK": "constexpr", "ITERS": "constexpr"},
          {"IS_F64": f64, "BLOCK": 1024, "ITERS": 4}, {})
    build(tk.KERNELS["sqnorm_one"], {"x_ptr": "*" + dt, "n": "i64", "part_ptr": "*" + dt, "IS_F64": "constexpr",
          "BLOCK": "constexpr", "ITERS": "constexpr"}, {"IS_F64": f64, "BLOCK": 1024, "ITERS": 4}, aligned(3))
    build(tk.KERNELS["sum"], {"part_ptr": "*" + dt, "out_ptr": "*" + dt, "m": "i64", "IS_F64": "constexpr",
          "BLOCK": "constexpr", "ITERS": "constexpr"}, {"IS_F64": f64, "BLOCK": 1024, "ITERS": 3}, {})
print("compiled")
"""


def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stdout[-3000:] + res.stderr[-5000:]
