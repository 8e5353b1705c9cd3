"""ops.ema_update (avg <- decay*avg + (1-decay)*params, in place): every backend against the reference on fresh
random inputs, at weird sizes and unaligned offsets, with a float and a tensor decay; bad arguments; autograd."""

import os
import subprocess
import sys

import pytest
import torch

from odegan_kernels import ops
from odegan_kernels.ops import reference

from .conftest import DEVICE, TOL, assert_close, poison

BACKENDS = [b for b in ("foreach", "triton", "csrc") if ops.why_unavailable(b) is None]
NATIVE = BACKENDS if DEVICE.type == "cuda" else [b for b in BACKENDS if b != "triton"]
SIZES = [0, 1, 2, 3, 4, 5, 7, 13, 31, 1021, 4099]  # empty, tiny, primes, not multiples of a 16-byte vector
GUARD = 8  # elements on each side of the buffers, poisoned: a write outside them is caught


def guarded(n: int, offset: int, dtype, gen, fill=None):
    """A length-n view at ``offset`` elements into a NaN-poisoned allocation (offset 1 or 3: not 16-byte aligned),
    filled with fresh random values; returns (the whole allocation, the view)."""
    base = poison(torch.empty(n + offset + 2 * GUARD, dtype=dtype, device=DEVICE))
    view = base[GUARD + offset : GUARD + offset + n]
    view.copy_(torch.randn(n, generator=gen, dtype=dtype) if fill is None else fill)
    return base, view


def untouched(base: torch.Tensor, n: int, offset: int) -> bool:
    lo, hi = GUARD + offset, GUARD + offset + n
    return bool(base[:lo].isnan().all() and base[hi:].isnan().all())


def make_decay(kind: str, dtype, gen):
    d = torch.rand((), generator=gen, dtype=torch.float64).item()  # a double: not exact in float32
    return d if kind == "float" else torch.tensor(d, dtype=dtype, device=DEVICE)


def check_against_reference(backend, n, dtype, kind, gen, offsets=(0, 0)):
    decay = make_decay(kind, dtype, gen)
    base_a, avg = guarded(n, offsets[0], dtype, gen)
    base_p, params = guarded(n, offsets[1], dtype, gen)
    want = avg.clone()
    reference.ema_update(want, params.clone(), decay)
    before = params.clone()
    ops.ema_update(avg, params, decay, backend=backend)
    what = f"{backend} n={n} {dtype} decay={decay} offsets={offsets}"
    assert_close(avg, want, what=what, **TOL[dtype])
    assert untouched(base_a, n, offsets[0]), f"{what}: wrote outside avg"
    assert untouched(base_p, n, offsets[1]) and torch.equal(params, before), f"{what}: wrote params"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_ema_matches_reference(backend, n, kind, rng):
    check_against_reference(backend, n, torch.float32, kind, rng)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offsets", [(1, 1), (3, 3), (0, 1), (2, 0)])
@pytest.mark.parametrize("n", [1, 7, 1021])
def test_ema_unaligned_offsets(backend, offsets, n, rng):
    """Buffers that start off a 16-byte boundary, alike or differently: the compiled kernels' scalar paths."""
    for kind in ("float", "tensor"):
        check_against_reference(backend, n, torch.float32, kind, rng, offsets)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 3, 1021])
def test_ema_float64(backend, n, rng):
    """float64 buffers keep a float decay in float64 (a Triton float argument alone would round it to float32)."""
    for kind in ("float", "tensor"):
        check_against_reference(backend, n, torch.float64, kind, rng, offsets=(1, 1))


@pytest.mark.parametrize("backend", NATIVE)
def test_ema_large(backend, rng):
    for kind in ("float", "tensor"):
        check_against_reference(backend, 2**20 + 7, torch.float32, kind, rng)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_ema_end_points_are_exact(backend, rng):
    """decay 1 keeps the average bit for bit; decay 0 makes it the parameters bit for bit."""
    avg, params = (torch.randn(1021, generator=rng).to(DEVICE) for _ in range(2))
    for kind in ("float", "tensor"):
        for decay, want in ((1.0, avg.clone()), (0.0, params)):
            got = avg.clone()
            ops.ema_update(got, params, decay if kind == "float" else torch.tensor(decay, device=DEVICE), backend)
            assert torch.equal(got, want), (backend, kind, decay)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_ema_reads_a_tensor_decay_at_each_call(backend, rng):
    """A tensor decay changed in place between calls is read anew each time (what a graph replay relies on), and
    repeated calls compose: a constant parameter vector is approached geometrically."""
    n = 257
    params = torch.randn(n, generator=rng).to(DEVICE)
    avg, want = torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)
    decay = torch.tensor(0.5, device=DEVICE)
    for value in (0.5, 0.9, 0.0, 0.99):
        decay.fill_(value)
        ops.ema_update(avg, params, decay, backend=backend)
        reference.ema_update(want, params, value)
        assert_close(avg, want, what=f"{backend} decay {value}", **TOL[torch.float32])
    # after decay 0 the average is params; after one more step at 0.99 it still is (a fixed point)
    assert_close(avg, params, what=backend, **TOL[torch.float32])


# -- bad arguments: a TypeError or ValueError that names the argument, nothing written ----------------
def _meta(n=16):
    return torch.zeros(n, device="meta")


BAD_EMA_ARGS = [
    (dict(decay=1.5), ValueError, r"decay must be in \[0, 1\].*1\.5"),
    (dict(decay=-0.1), ValueError, r"decay must be in \[0, 1\]"),
    (dict(decay=float("nan")), ValueError, "decay must be finite"),
    (dict(decay=float("inf")), ValueError, "decay must be finite"),
    (dict(decay="0.9"), TypeError, "decay must be a float in .* or a 0-dim tensor, got str"),
    (dict(decay=None), TypeError, "decay must be a float .*got NoneType"),
    (dict(decay=True), TypeError, "decay must be a float .*got bool"),
    (dict(decay=torch.ones(1)), ValueError, r"decay must be a float or a 0-dim tensor, got a tensor of shape \(1,\)"),
    (dict(decay=torch.tensor(0.5, dtype=torch.float64)), TypeError, r"decay is torch.float64 .*decay.to"),
    (dict(decay=torch.tensor(0.5, device="meta")), ValueError, "decay is on meta.*decay.to"),
    (dict(decay=torch.tensor(0.5).to_sparse()), TypeError, "decay is a torch.sparse_coo tensor"),
    (dict(avg=torch.zeros(4, 4)), ValueError, "avg must be a flat 1-D buffer"),
    (dict(params=torch.zeros(32)[::2]), ValueError, "params must be contiguous"),
    (dict(params=torch.zeros(16, dtype=torch.float64)), TypeError, "params is torch.float64 but avg is torch.float32"),
    (dict(params=torch.zeros(15)), ValueError, "params has 15 elements but avg has 16"),
    (dict(params=_meta()), ValueError, "params is on meta but avg is on"),
    (dict(avg=torch.zeros(16, dtype=torch.int64)), TypeError, "avg is torch.int64; this backend supports"),
    (dict(avg=torch.zeros(16, dtype=torch.float16)), TypeError, "avg is torch.float16"),
    (dict(avg=[0.0] * 16), TypeError, "avg must be a tensor, got list"),
    (dict(params=torch.zeros(16).to_sparse()), TypeError, "params is a torch.sparse_coo tensor"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
    (dict(backend=None), TypeError, "backend must be a string"),
]


@pytest.mark.parametrize("backend", ["reference", "auto"] + BACKENDS)
@pytest.mark.parametrize("kwargs, exc, match", BAD_EMA_ARGS, ids=lambda v: str(v)[:40] if isinstance(v, dict) else "")
def test_ema_bad_arguments(backend, kwargs, exc, match):
    avg = torch.full((16,), 7.0, device=DEVICE)
    args = dict(avg=avg, params=torch.ones(16, device=DEVICE), decay=0.5, backend=backend)
    movable = lambda v: isinstance(v, torch.Tensor) and v.device.type == "cpu" and not v.is_sparse
    args.update({k: v.to(DEVICE) if movable(v) else v for k, v in kwargs.items()})
    with pytest.raises(exc, match=match):
        ops.ema_update(**args)
    assert avg.eq(7.0).all(), "a refused call wrote avg"


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_ema_overlapping_buffers_are_refused(backend):
    buf = torch.zeros(40, device=DEVICE)
    with pytest.raises(ValueError, match="avg .* overlaps params"):
        ops.ema_update(buf[:20], buf[10:30], 0.5, backend=backend)
    with pytest.raises(ValueError, match="avg .* overlaps params"):
        ops.ema_update(buf[:20], buf[:20], 0.5, backend=backend)
    with pytest.raises(ValueError, match="avg .* overlaps decay"):
        ops.ema_update(buf[:20], buf[20:40], buf[5], backend=backend)
    ops.ema_update(buf[:20], buf[20:40], buf[25], backend=backend)  # decay may live in params: only read


@pytest.mark.skipif(DEVICE.type != "cpu", reason="a tensor decay's value is checked where that costs no sync: a CPU")
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_ema_cpu_tensor_decay_value_is_checked(backend):
    avg = torch.zeros(8)
    for bad in (1.5, -1.0, float("nan")):
        with pytest.raises(ValueError, match="decay must be"):
            ops.ema_update(avg, torch.ones(8), torch.tensor(bad), backend=backend)
    assert avg.eq(0).all()


# -- autograd: refused with tensors that require grad, avg's version bumped ---------------------------
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("name", ["avg", "params", "decay"])
def test_ema_refuses_tensors_that_require_grad(backend, name):
    args = dict(avg=torch.full((32,), 7.0, device=DEVICE), params=torch.ones(32, device=DEVICE))
    args["decay"] = torch.tensor(0.5, device=DEVICE)
    args[name].requires_grad_()
    with pytest.raises(RuntimeError, match=f"{name} requires grad.*detach\\(\\) or call it under torch.no_grad"):
        ops.ema_update(**args, backend=backend)
    assert args["avg"].detach().eq(7.0).all(), "the refused call wrote avg"


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_ema_bumps_avg_version(backend):
    avg = torch.zeros(32, device=DEVICE, requires_grad=True)
    w = torch.ones(32, device=DEVICE, requires_grad=True)
    loss = (w * avg).sum()  # saves avg for w's gradient
    with torch.no_grad():
        ops.ema_update(avg, torch.ones(32, device=DEVICE), 0.5, backend=backend)
    assert avg.detach().eq(0.5).all()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_ema_auto_records_its_choice():
    ops.ema_update(torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE), 0.5)
    assert ops.choices[("ema_update", DEVICE.type)] in BACKENDS


# -- the Triton kernel compiles for a GPU, with 16-byte accesses on aligned buffers --------------------
COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from odegan_kernels.ops import triton_kernels as tk

target = GPUTarget("cuda", 90, 32)
for dt, vec in (("fp32", "v4"), ("fp64", "v2")):
    sig = {"avg_ptr": "*" + dt, "p_ptr": "*" + dt, "decay_ptr": "*" + dt, "decay": "fp32", "n": "i32",
           "DECAY_PTR": "constexpr", "BLOCK": "constexpr"}
    for decay_ptr in (False, True):
        for block, warps in ((1024, 4), (4096, 8)):
            consts = {"DECAY_PTR": decay_ptr, "BLOCK": block}
            # the buffers aligned; n of no known divisibility (not specialised on): full blocks vectorise anyway
            aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1)}
            for attrs in (aligned, {}):
                src = triton.compiler.ASTSource(fn=tk.KERNELS["ema"], signature=sig, constexprs=consts, attrs=attrs)
                ptx = triton.compile(src, target=target, options={"num_warps": warps}).asm["ptx"]
                if attrs:
                    assert f"ld.global.{vec}" in ptx and f"st.global.{vec}" in ptx, (dt, decay_ptr, block)
print("compiled")
"""


def test_triton_ema_kernel_compiles_for_sm90():
    """As tests/test_triton_compile.py does for the other kernels: the interpreter does not type-check like the
    compiler, so compile the real thing for sm_90 with Triton's own ptxas, in a subprocess."""
    pytest.importorskip("triton", reason="triton not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stdout[-3000:] + res.stderr[-5000:]
