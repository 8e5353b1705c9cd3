"""Compile every Triton kernel for sm_90 ahead of time, without a GPU.

The interpreter (how the other tests run Triton on a CPU) does not type-check like the compiler: it let
through a kernel that could never compile for a GPU. This test compiles the real thing with Triton's own
ptxas, in a subprocess (TRITON_INTERPRET is decided when triton is imported), and checks that the hot paths use
16-byte vector accesses when pointers are aligned, as FlatParams guarantees, whatever the length: the lengths are
not specialised on (a compiled variant per size class otherwise), so a full block must vectorise by itself.
(ema_update's kernel: tests/test_ema.py.)
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
D = [["tt.divisibility", 16]]

def build(fn, sig, consts, aligned=(), warps=4):
    # aligned: the pointer arguments a launch would find 16-byte aligned (Triton's 'D' specialisation)
    names = list(sig)
    attrs = {(names.index(a),): D for a in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": warps}).asm["ptx"]

stage_sig = {"p_ptr": "*fp32", "g_ptr": "*fp32", "x0_ptr": "*fp32", "acc_ptr": "*fp32", "r_ptr": "*fp32",
             "coef_ptr": "*fp32", "seg_ptr": "*i64", "n": "i32", "r_len": "i32", "NSEG": "constexpr",
             "HAS_REG": "constexpr", "WRITE_X0": "constexpr", "BLOCK": "constexpr"}
bufs = ("p_ptr", "g_ptr", "x0_ptr", "acc_ptr", "r_ptr")
for nseg in (1, 2, 5, tk.MAX_SEGMENTS):
    for has_reg in (False, True):
        for write in (False, True):
            for block, warps in ((1024, 4), (4096, 8)):
                consts = {"NSEG": nseg, "HAS_REG": has_reg, "WRITE_X0": write, "BLOCK": block}
                ptx = build(tk.KERNELS["stage"], stage_sig, consts, bufs, warps)
                assert "ld.global.v4" in ptx and "st.global.v4" in ptx, (nseg, has_reg, write, block)
                build(tk.KERNELS["stage"], stage_sig, consts)  # unaligned pointers compile too
stage_sig64 = {k: ("*fp64" if v == "*fp32" else v) for k, v in stage_sig.items()}
build(tk.KERNELS["stage"], stage_sig64, {"NSEG": 2, "HAS_REG": True, "WRITE_X0": True, "BLOCK": 1024}, bufs)
build(tk.KERNELS["stage"], dict(stage_sig, n="i64", r_len="i64"),  # a buffer past 2**31 elements
      {"NSEG": 2, "HAS_REG": True, "WRITE_X0": True, "BLOCK": 4096}, bufs, 8)
for dt, f64 in (("fp32", False), ("fp64", True)):
    for aligned in (False, True):
        ptx = build(tk.KERNELS["sqnorm_partials"], {"addr_ptr": "*i64", "len_ptr": "*i64", "part_ptr": "*" + dt,
                    "part_off": "i32", "IS_F64": "constexpr", "ALIGNED": "constexpr", "BLOCK": "constexpr",
                    "ITERS": "constexpr"}, {"IS_F64": f64, "ALIGNED": aligned, "BLOCK": 1024, "ITERS": 4},
                    ("addr_ptr", "len_ptr", "part_ptr"))
        # a pointer loaded from the table vectorises only with the alignment the host promised
        assert ("ld.global.v4" in ptx or "ld.global.v2.b64" in ptx) == aligned, (dt, aligned)
    sq_sig = {"x_ptr": "*" + dt, "n": "i32", "part_ptr": "*" + dt, "part_off": "i32", "IS_F64": "constexpr",
              "BLOCK": "constexpr", "ITERS": "constexpr"}
    ptx = build(tk.KERNELS["sqnorm_one"], sq_sig, {"IS_F64": f64, "BLOCK": 1024, "ITERS": 4}, ("x_ptr", "part_ptr"))
    assert "ld.global.v4" in ptx or "ld.global.v2.b64" in ptx, dt
    build(tk.KERNELS["sqnorm_one"], sq_sig, {"IS_F64": f64, "BLOCK": 1024, "ITERS": 4})
    build(tk.KERNELS["sum"], {"part_ptr": "*" + dt, "out_ptr": "*" + dt, "m": "i32", "IS_F64": "constexpr",
          "BLOCK": "constexpr"}, {"IS_F64": f64, "BLOCK": 1024}, ("part_ptr", "out_ptr"))
print("compiled")
"""


def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stdout[-3000:] + res.stderr[-5000:]
