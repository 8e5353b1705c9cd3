"""The Triton kernel of ema_update (avg <- decay*avg + (1-decay)*params over flat buffers) and its custom op,
``odegan_kernels::triton_ema_update``; triton_kernels, the Triton backend, exports it.

The decay is a kernel argument (a float) or read on the device from a 0-dim tensor, so a captured CUDA graph
replays with whatever that tensor holds.
"""

from __future__ import annotations

import torch

from .utils import launch_settings

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; the dispatch says why this backend is off
    triton = None

if triton is not None:

    @triton.jit
    def _ema_block(avg_ptr, p_ptr, offs, mask, d, w):
        a = tl.load(avg_ptr + offs, mask=mask, other=0.0)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        tl.store(avg_ptr + offs, d * a + w * p, mask=mask)

    # n is not specialised on (a variant per size class otherwise): full blocks take an unmasked path, which keeps
    # 16-byte accesses for any n. decay_ptr is read once (and is any buffer when DECAY_PTR is off): its alignment
    # is not specialised on either.
    @triton.jit(do_not_specialize=["decay_ptr", "n"])
    def _ema_kernel(avg_ptr, p_ptr, decay_ptr, decay, n, DECAY_PTR: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        if DECAY_PTR:
            d = tl.load(decay_ptr)
        else:
            d = decay
        w = 1.0 - d  # in the decay's dtype: the two weights sum to one there
        if pid * BLOCK + BLOCK <= n:
            _ema_block(avg_ptr, p_ptr, offs, tl.full([BLOCK], 1, tl.int1), d, w)
        else:
            _ema_block(avg_ptr, p_ptr, offs, offs < n, d, w)

    EMA_KERNELS = {"ema": _ema_kernel}  # for ahead-of-time compilation (tests/test_triton_compile.py)
else:
    EMA_KERNELS = {}


def launch_ema(avg: torch.Tensor, params: torch.Tensor, decay_tensor: torch.Tensor | None, decay: float) -> None:
    """One launch over the buffers; ``decay_tensor`` (0-dim, on their device) when given, else ``decay``."""
    n = avg.numel()
    if n == 0:
        return
    if decay_tensor is None and avg.dtype == torch.float64:
        # a float kernel argument is fp32 in Triton: fp64 buffers read a float64 decay from the device instead
        decay_tensor = torch.full((), decay, dtype=avg.dtype, device=avg.device)
    block, warps = launch_settings(n)
    _ema_kernel[(triton.cdiv(n, block),)](
        avg,
        params,
        decay_tensor if decay_tensor is not None else avg,  # not read unless DECAY_PTR
        0.0 if decay_tensor is not None else decay,
        n,
        DECAY_PTR=decay_tensor is not None,
        BLOCK=block,
        num_warps=warps,
    )


@torch.library.custom_op("odegan_kernels::triton_ema_update", mutates_args=("avg",))
def triton_ema_update(avg: torch.Tensor, params: torch.Tensor, decay_tensor: torch.Tensor | None, decay: float) -> None:
    launch_ema(avg, params, decay_tensor, decay)


@triton_ema_update.register_fake
def _(avg, params, decay_tensor, decay):
    return None


def ema_update(avg, params, decay):
    """The backend's ema_update: ``decay`` a float or a 0-dim tensor on the buffers' device."""
    if isinstance(decay, torch.Tensor):
        torch.ops.odegan_kernels.triton_ema_update(avg, params, decay, 0.0)
    else:
        torch.ops.odegan_kernels.triton_ema_update(avg, params, None, decay)
