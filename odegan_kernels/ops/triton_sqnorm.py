"""The Triton kernels of sqnorm (the sum of squares over a list of tensors: partial sums per chunk, then one
fixed-order sum) and its custom op, ``odegan_kernels::triton_sqnorm``; triton_kernels, the Triton backend, exports
it. Differentiable twice through utils.register_sqnorm_op.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .utils import device_table, register_sqnorm_op

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; the dispatch says why this backend is off
    triton = None

if triton is not None:

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

    # for ahead-of-time compilation (tests/test_triton_compile.py)
    SQNORM_KERNELS = {"sqnorm_partials": _sqnorm_partials_kernel, "sqnorm_one": _sqnorm_one_kernel, "sum": _sum_kernel}
else:
    SQNORM_KERNELS = {}


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
    hit = (device_table(addrs, dev), device_table(lens, dev), all(a % 16 == 0 for a in addrs))
    _table_cache[key] = hit
    if len(_table_cache) > 32:
        _table_cache.popitem(last=False)
    return hit


# Device types on which an eager sqnorm first runs the per-tensor (capture) path once for its signature
# (_warm_capture_path): a GPU, where a capture may come later. bench/triton_keys.py adds "cpu" to count, under the
# interpreter, the variants a GPU run compiles.
CAPTURE_WARMUP_DEVICES = {"cuda"}
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
        if not capturing and out.device.type in CAPTURE_WARMUP_DEVICES:
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


@torch.library.custom_op("odegan_kernels::triton_sqnorm", mutates_args=())
def triton_sqnorm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return launch_sqnorm([t.contiguous() for t in tensors])


register_sqnorm_op("odegan_kernels::triton_sqnorm")


def sqnorm(tensors):
    return torch.ops.odegan_kernels.triton_sqnorm(list(tensors))
