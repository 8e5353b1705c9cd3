"""Triton kernels: the RK stage over all segments in one launch, a multi-tensor sqnorm, and (from triton_ema) the
weight average's update.

All are torch.library custom ops (``odegan_kernels::triton_stage``, ``triton_sqnorm``, ``triton_ema_update``), so
they run under torch.compile and inside CUDA graphs. Scalars come from device tensors: a captured graph
replays with whatever the coefficient tensor holds. On a CPU they run under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from .triton_ema import EMA_KERNELS, ema_update  # noqa: F401  (ema_update: this backend's op, beside its kernel)
from .utils import launch_settings, register_sqnorm_op

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

    @triton.jit
    def _sq_sum(ptr, base, length, IS_F64: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        """Sum of squares of ptr[base : base + min(length, BLOCK * ITERS)]: unmasked (16-byte loads where the pointer
        is known aligned) when the piece is whole, masked for a tensor's last piece."""
        if IS_F64:
            total = tl.zeros([BLOCK], dtype=tl.float64)
        else:
            total = tl.zeros([BLOCK], dtype=tl.float32)
        if length >= BLOCK * ITERS:
            for it in tl.static_range(ITERS):
                x = tl.load(ptr + base + it * BLOCK + tl.arange(0, BLOCK))
                total += x * x
        else:
            for it in tl.static_range(ITERS):
                offs = it * BLOCK + tl.arange(0, BLOCK)
                x = tl.load(ptr + base + offs, mask=offs < length, other=0.0)
                total += x * x
        return tl.sum(total, axis=0)

    @triton.jit(do_not_specialize=["part_off"])
    def _sqnorm_partials_kernel(
        addr_ptr,
        len_ptr,
        part_ptr,
        part_off,
        IS_F64: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
        ITERS: tl.constexpr,
    ):
        # one program per CHUNK of the address table; ALIGNED: every chunk address is 16-byte aligned (checked on
        # the host), which a pointer made from a loaded integer cannot tell the compiler by itself
        pid = tl.program_id(0)
        addr = tl.load(addr_ptr + pid)
        length = tl.load(len_ptr + pid)
        if IS_F64:
            ptr = addr.to(tl.pointer_type(tl.float64))
        else:
            ptr = addr.to(tl.pointer_type(tl.float32))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        tl.store(part_ptr + part_off + pid, _sq_sum(ptr, 0, length, IS_F64, BLOCK, ITERS))

    @triton.jit(do_not_specialize=["n", "part_off"])
    def _sqnorm_one_kernel(
        x_ptr, n, part_ptr, part_off, IS_F64: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr
    ):
        # one tensor, its pointer an argument (so its alignment is known), one program per CHUNK: the path of a
        # single tensor and of a capture (no address table to build)
        base = tl.program_id(0).to(tl.int64) * (BLOCK * ITERS)
        tl.store(part_ptr + part_off + tl.program_id(0), _sq_sum(x_ptr, base, n - base, IS_F64, BLOCK, ITERS))

    @triton.jit(do_not_specialize=["m"])
    def _sum_kernel(part_ptr, out_ptr, m, IS_F64: tl.constexpr, BLOCK: tl.constexpr):
        # one program, fixed order: the result does not depend on scheduling (deterministic). The bound m is a
        # runtime value (a while loop: the interpreter cannot range() over a runtime scalar), so every number of
        # partials shares one compiled kernel.
        if IS_F64:
            total = tl.zeros([BLOCK], dtype=tl.float64)
        else:
            total = tl.zeros([BLOCK], dtype=tl.float32)
        start = 0
        while start < m:
            offs = start + tl.arange(0, BLOCK)
            total += tl.load(part_ptr + offs, mask=offs < m, other=0.0)
            start += BLOCK
        tl.store(out_ptr, tl.sum(total, axis=0))

    # every kernel by name, for ahead-of-time compilation (tests/test_triton_compile.py)
    KERNELS = {
        "stage": _stage_kernel,
        "sqnorm_partials": _sqnorm_partials_kernel,
        "sqnorm_one": _sqnorm_one_kernel,
        "sum": _sum_kernel,
        **EMA_KERNELS,
    }
else:
    KERNELS = {}

_seg_cache: dict = {}


def _device_table(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 table on the device. Built from pinned memory with a non-blocking copy, so a cache miss in
    an eager step costs no host sync. Never built inside a graph capture: the segment table is made in
    the warm-up steps, and sqnorm launches per tensor while capturing."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64, device=device)
    return torch.tensor(values, dtype=torch.int64).pin_memory().to(device, non_blocking=True)


def _segment_table(starts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    key = (starts, device)
    tab = _seg_cache.get(key)
    if tab is None:
        tab = _device_table(list(starts), device)
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


SQ_BLOCK, SQ_ITERS = 1024, 4
SQ_CHUNK = SQ_BLOCK * SQ_ITERS
_table_cache: OrderedDict = OrderedDict()


def _chunk_table(tensors) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(address, length) of every CHUNK-sized piece of every tensor, and whether every address is 16-byte aligned;
    cached by the tensors' addresses so steady-state calls (and a graph's replays, whose pool addresses are fixed)
    build nothing."""
    # the element size is in the key: a float64 view of float32 storage has the same address and may have
    # the same length, but other chunk addresses
    key = tuple((t.data_ptr(), t.numel(), t.dtype, t.device) for t in tensors)
    hit = _table_cache.get(key)
    if hit is not None:
        _table_cache.move_to_end(key)
        return hit
    addrs, lens = [], []
    for t in tensors:
        size = t.element_size()
        for start in range(0, t.numel(), SQ_CHUNK):
            addrs.append(t.data_ptr() + start * size)
            lens.append(min(SQ_CHUNK, t.numel() - start))
    dev = tensors[0].device
    hit = (_device_table(addrs, dev), _device_table(lens, dev), all(a % 16 == 0 for a in addrs))
    _table_cache[key] = hit
    if len(_table_cache) > 32:
        _table_cache.popitem(last=False)
    return hit


def _warms_capture_path(device: torch.device) -> bool:
    """Whether an eager call first runs the per-tensor path once for its signature (see _warm_capture_path): on a
    GPU, where a capture may come later."""
    return device.type == "cuda"


_warmed: set = set()


def _warm_capture_path(tensors) -> None:
    """Run the per-tensor path once, eagerly, for every new signature of a call: the variants a capture will
    launch are then compiled and loaded before it (loading a module during a capture is refused on some
    drivers). Triton specialises that kernel on its dtype and on the pointer's 16-byte alignment (not on the
    lengths), so those are the key."""
    key = (tensors[0].dtype, frozenset(t.data_ptr() % 16 == 0 for t in tensors))
    if key not in _warmed:
        launch_sqnorm(tensors, per_tensor=True)
        _warmed.add(key)


def launch_sqnorm(tensors, per_tensor: bool | None = None) -> torch.Tensor:
    """Partial sums per CHUNK, then one fixed-order sum (deterministic).

    Partials come from one launch per tensor with its pointer as an argument (one tensor; or while a CUDA graph is
    being captured, where a new table would need a host copy), else from one launch over an address table.
    """
    tensors = [t for t in tensors if t.numel() > 0]
    dtype = tensors[0].dtype if tensors else torch.float32
    out = torch.zeros((), dtype=dtype, device=tensors[0].device if tensors else None)
    if not tensors:
        return out
    if per_tensor is None:
        capturing = out.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        per_tensor = capturing or len(tensors) == 1
        if not capturing and _warms_capture_path(out.device):
            _warm_capture_path(tensors)
    is_f64 = dtype == torch.float64
    if per_tensor:
        chunks = [triton.cdiv(t.numel(), SQ_CHUNK) for t in tensors]
        m = sum(chunks)
        partials = torch.empty(m, dtype=dtype, device=out.device)
        start = 0
        for t, c in zip(tensors, chunks):
            _sqnorm_one_kernel[(c,)](
                t, t.numel(), partials, start, IS_F64=is_f64, BLOCK=SQ_BLOCK, ITERS=SQ_ITERS, num_warps=4
            )
            start += c
    else:
        addrs, lens, aligned = _chunk_table(tensors)
        m = addrs.numel()
        partials = torch.empty(m, dtype=dtype, device=out.device)
        _sqnorm_partials_kernel[(m,)](
            addrs, lens, partials, 0, IS_F64=is_f64, ALIGNED=aligned, BLOCK=SQ_BLOCK, ITERS=SQ_ITERS, num_warps=4
        )
    _sum_kernel[(1,)](partials, out, m, IS_F64=is_f64, BLOCK=1024, num_warps=4)
    return out


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


@torch.library.custom_op("odegan_kernels::triton_sqnorm", mutates_args=())
def triton_sqnorm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return launch_sqnorm([t.contiguous() for t in tensors])


register_sqnorm_op("odegan_kernels::triton_sqnorm")


# -- the backend interface used by ops.dispatch ------------------------------------------------------------
def stage(params, grads, x0, acc, coeffs, segments, reg_grad=None, write_x0=False):
    starts = [s for s, _ in segments]
    torch.ops.odegan_kernels.triton_stage(params, grads, x0, acc, coeffs, starts, reg_grad, write_x0)


def sqnorm(tensors):
    return torch.ops.odegan_kernels.triton_sqnorm(list(tensors))
