"""Triton kernels: the RK stage over all segments in one launch, and (from triton_sqnorm and triton_ema) the
multi-tensor sqnorm and the weight average's update: the Triton backend.

All are torch.library custom ops (``odegan_kernels::triton_stage``, ``triton_sqnorm``, ``triton_ema_update``), so
they run under torch.compile and inside CUDA graphs. Scalars come from device tensors: a captured graph
replays with whatever the coefficient tensor holds. On a CPU they run under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import os

import torch

from .triton_ema import EMA_KERNELS, ema_update  # noqa: F401  (ema_update: this backend's op, beside its kernel)
from .triton_sqnorm import SQNORM_KERNELS, sqnorm  # noqa: F401  (sqnorm: this backend's op, beside its kernels)
from .utils import device_table, launch_settings

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; the dispatch says why this backend is off
    triton = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> tuple[bool, str]:
    if triton is None:
        return False, "triton is not installed"
    if torch.cuda.is_available() or _interpreting():
        return True, ""
    return False, "no CUDA device (TRITON_INTERPRET=1 runs the Triton kernels on the CPU, slowly, for tests)"


def supports(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


if triton is not None:

    @triton.jit
    def _stage_block(
        p_ptr,
        g_ptr,
        x0_ptr,
        acc_ptr,
        r_ptr,
        r_len,
        first,
        offs,
        mask,
        a,
        b,
        c,
        d,
        e,
        HAS_REG: tl.constexpr,
        WRITE_X0: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # a..e are scalars (the block lies in one segment) or per-element blocks (it straddles a boundary). mask is
        # a constant all-true block for a full block: then every access is a 16-byte vector one where aligned.
        k = tl.load(g_ptr + offs, mask=mask, other=0.0)
        if HAS_REG:
            if first + BLOCK <= r_len:  # r covers the whole block
                k = k + e * tl.load(r_ptr + offs, mask=mask, other=0.0)
            elif first < r_len:  # r (D's prefix) ends inside it
                k = k + e * tl.load(r_ptr + offs, mask=mask & (offs < r_len), other=0.0)
        # acc is not read where a == 0 (stage 1): saves a fifth of the traffic there, and a stale or
        # uninitialised acc cannot leak in.
        read_acc = (a + tl.zeros([BLOCK], dtype=a.dtype)) != 0
        acc = tl.load(acc_ptr + offs, mask=mask & read_acc, other=0.0)
        acc = a * acc + b * k
        x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0)
        p = x0 + c * k + d * acc
        tl.store(acc_ptr + offs, acc, mask=mask)
        tl.store(p_ptr + offs, p, mask=mask)
        if WRITE_X0:
            tl.store(x0_ptr + offs, p, mask=mask)

    # n and r_len are not specialised on (their value mod 16 would otherwise compile a variant per size class):
    # full blocks take an unmasked path instead, which keeps the 16-byte accesses for any n. The coefficient and
    # segment tables are read a scalar at a time, so their alignment is not specialised on either.
    @triton.jit(do_not_specialize=["coef_ptr", "seg_ptr", "n", "r_len"])
    def _stage_kernel(
        p_ptr,
        g_ptr,
        x0_ptr,
        acc_ptr,
        r_ptr,
        coef_ptr,
        seg_ptr,
        n,
        r_len,
        NSEG: tl.constexpr,
        HAS_REG: tl.constexpr,
        WRITE_X0: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        first = pid * BLOCK
        offs = first + tl.arange(0, BLOCK)
        # Segments are long against a block: find the segments of the block's first and last element
        # (scalars) and use uniform coefficients unless the block straddles a boundary.
        last = tl.minimum(first + BLOCK, n) - 1
        s_first = 0
        s_last = 0
        for i in tl.static_range(1, NSEG):
            start = tl.load(seg_ptr + i)
            s_first += (first >= start).to(tl.int32)
            s_last += (last >= start).to(tl.int32)
        if (s_first == s_last) & (first + BLOCK <= n):  # the common case: a full block inside one segment
            coef = coef_ptr + s_first * 5
            _stage_block(
                p_ptr,
                g_ptr,
                x0_ptr,
                acc_ptr,
                r_ptr,
                r_len,
                first,
                offs,
                tl.full([BLOCK], 1, tl.int1),
                tl.load(coef),
                tl.load(coef + 1),
                tl.load(coef + 2),
                tl.load(coef + 3),
                tl.load(coef + 4),
                HAS_REG,
                WRITE_X0,
                BLOCK,
            )
        else:  # the buffer's last block, or one across a segment boundary: masked, coefficients per element
            mask = offs < n
            seg = tl.zeros([BLOCK], dtype=tl.int32)
            for i in tl.static_range(1, NSEG):
                seg += (offs >= tl.load(seg_ptr + i)).to(tl.int32)
            rows = coef_ptr + seg * 5  # a 5-value row per segment: the gathers hit one cache line
            _stage_block(
                p_ptr,
                g_ptr,
                x0_ptr,
                acc_ptr,
                r_ptr,
                r_len,
                first,
                offs,
                mask,
                tl.load(rows, mask=mask, other=0.0),
                tl.load(rows + 1, mask=mask, other=0.0),
                tl.load(rows + 2, mask=mask, other=0.0),
                tl.load(rows + 3, mask=mask, other=0.0),
                tl.load(rows + 4, mask=mask, other=0.0),
                HAS_REG,
                WRITE_X0,
                BLOCK,
            )

    # every kernel by name, for ahead-of-time compilation (tests/test_triton_compile.py)
    KERNELS = {
        "stage": _stage_kernel,
        **SQNORM_KERNELS,
        **EMA_KERNELS,
    }
else:
    KERNELS = {}

_seg_cache: dict = {}


def _segment_table(starts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    key = (starts, device)
    tab = _seg_cache.get(key)
    if tab is None:
        tab = device_table(list(starts), device)
        _seg_cache[key] = tab
    return tab


MAX_SEGMENTS = 8  # per launch: the kernel unrolls a loop over its NSEG segments; more go in groups of this many


def launch_stage(params, grads, x0, acc, coeffs, starts: list[int], reg_grad, write_x0: bool) -> None:
    """The stage over every segment: one launch per group of up to MAX_SEGMENTS segments (one launch for the
    usual two players), each over its own part of the buffers."""
    n = params.numel()
    bounds = list(starts) + [n]
    for first in range(0, len(starts), MAX_SEGMENTS):
        last = min(first + MAX_SEGMENTS, len(starts))
        lo, hi = bounds[first], bounds[last]
        if hi == lo:
            continue  # empty segments only
        if (lo, hi) == (0, n):
            _launch_group(params, grads, x0, acc, reg_grad, coeffs, tuple(starts), write_x0)
            continue
        r = reg_grad
        if r is not None and lo > 0:
            r = r[lo : min(hi, r.numel())] if r.numel() > lo else None
        part = [t[lo:hi] for t in (params, grads, x0, acc)]
        _launch_group(*part, r, coeffs[first:last], tuple(s - lo for s in starts[first:last]), write_x0)


def _launch_group(params, grads, x0, acc, reg_grad, coeffs, starts: tuple[int, ...], write_x0: bool) -> None:
    n = params.numel()
    block, warps = launch_settings(n)
    _stage_kernel[(triton.cdiv(n, block),)](
        params,
        grads,
        x0,
        acc,
        reg_grad if reg_grad is not None else grads,
        coeffs,
        _segment_table(starts, params.device),
        n,
        reg_grad.numel() if reg_grad is not None else 0,
        NSEG=len(starts),
        HAS_REG=reg_grad is not None,
        WRITE_X0=write_x0,
        BLOCK=block,
        num_warps=warps,
    )


# -- torch.library registration ---------------------------------------------------------------------------
@torch.library.custom_op("odegan_kernels::triton_stage", mutates_args=("params", "x0", "acc"))
def triton_stage(
    params: torch.Tensor,
    grads: torch.Tensor,
    x0: torch.Tensor,
    acc: torch.Tensor,
    coeffs: torch.Tensor,
    starts: list[int],
    reg_grad: torch.Tensor | None,
    write_x0: bool,
) -> None:
    launch_stage(params, grads, x0, acc, coeffs, list(starts), reg_grad, write_x0)


@triton_stage.register_fake
def _(params, grads, x0, acc, coeffs, starts, reg_grad, write_x0):
    return None


# -- the backend interface used by ops.dispatch ------------------------------------------------------------
def stage(params, grads, x0, acc, coeffs, segments, reg_grad=None, write_x0=False):
    starts = [s for s, _ in segments]
    torch.ops.odegan_kernels.triton_stage(params, grads, x0, acc, coeffs, starts, reg_grad, write_x0)
