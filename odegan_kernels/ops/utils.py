"""Input validation shared by every backend of the fused ops, so each op fails the same clear way."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

STAGE_COEFFS = ("a", "b", "c", "d", "e")


def _overlaps(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.numel() == 0 or y.numel() == 0:
        return False
    xs, ys = x.data_ptr(), y.data_ptr()
    xe = xs + x.numel() * x.element_size()
    ye = ys + y.numel() * y.element_size()
    return xs < ye and ys < xe


def as_coeffs(coeffs, nseg: int, like: torch.Tensor) -> torch.Tensor:
    """Per-segment stage scalars as an ``[nseg, 5]`` tensor (a, b, c, d, e) on the buffers' device."""
    if not isinstance(coeffs, torch.Tensor):
        usage = f"coeffs must be an [{nseg}, 5] tensor or a nested sequence of numbers (a, b, c, d, e per segment)"
        if coeffs is None or isinstance(coeffs, (str, bytes, dict, set)):
            raise TypeError(f"{usage}; got {type(coeffs).__name__}")
        try:
            coeffs = torch.tensor(coeffs, dtype=like.dtype, device=like.device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{usage}: {exc}") from None
    if coeffs.layout != torch.strided:
        raise TypeError(f"coeffs is a {coeffs.layout} tensor: pass a dense one (coeffs.to_dense())")
    if coeffs.dim() == 1 and nseg == 1:
        coeffs = coeffs.unsqueeze(0)
    if coeffs.shape != (nseg, 5):
        raise ValueError(f"coeffs must have shape [{nseg}, 5] (a, b, c, d, e per segment), got {tuple(coeffs.shape)}")
    if coeffs.device != like.device:
        raise ValueError(f"coeffs is on {coeffs.device} but the buffers are on {like.device}")
    if coeffs.dtype != like.dtype:
        raise TypeError(f"coeffs is {coeffs.dtype} but the buffers are {like.dtype}: pass coeffs.to({like.dtype})")
    return coeffs.contiguous()


def _bound(value, i: int, side: str) -> int:
    """A segment bound as an int: ints (and integer numpy/torch scalars) only; a float or a bool is refused,
    never truncated."""
    if not isinstance(value, bool) and not (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(
        f"segments[{i}] {side} must be an int (an element index), got {value!r} of type {type(value).__name__}"
    )


def check_segments(segments: Sequence[tuple[int, int]], n: int) -> tuple[tuple[int, int], ...]:
    """Segments as a tuple of (start, end) int pairs that cover [0, n) in order."""
    usage = "segments must be a sequence of (start, end) pairs covering the buffer in order, e.g. [(0, n)]"
    if isinstance(segments, (str, bytes, dict)):
        raise TypeError(f"{usage}; got {type(segments).__name__}")
    try:
        items = list(segments)
    except TypeError:
        raise TypeError(f"{usage}; got {type(segments).__name__}") from None
    segs = []
    for i, item in enumerate(items):
        if isinstance(item, (str, bytes)):
            raise TypeError(f"segments[{i}] must be a (start, end) pair, got {item!r}")
        try:
            a, b = item
        except (TypeError, ValueError):
            raise TypeError(f"segments[{i}] must be a (start, end) pair, got {item!r}") from None
        segs.append((_bound(a, i, "start"), _bound(b, i, "end")))
    if not segs:
        raise ValueError("segments is empty: give at least one (start, end) range")
    pos = 0
    for i, (a, b) in enumerate(segs):
        if a != pos or b < a:
            raise ValueError(
                f"segments must be contiguous ascending ranges covering [0, {n}); segment {i} "
                f"is [{a}, {b}) after position {pos}"
            )
        pos = b
    if pos != n:
        raise ValueError(f"segments cover [0, {pos}) but the buffers have {n} elements")
    return tuple(segs)


def _check_no_grad(name: str, t: torch.Tensor) -> None:
    """The stage op writes its buffers in place and has no derivative: with autograd recording, a tensor that
    requires grad would either be written behind autograd's back (a leaf) or lose its gradient path."""
    if t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{name} requires grad, but rk_stage updates flat buffers in place and is not differentiable: "
            f"pass {name}.detach() or call it under torch.no_grad() (FlatParams' buffers never require grad)"
        )


def check_stage_args(params, grads, x0, acc, coeffs, segments, reg, write_x0, dtypes=(torch.float32, torch.float64)):
    """Validate the stage op's arguments; return (coeffs tensor, segments tuple)."""
    if not isinstance(write_x0, bool):
        raise TypeError(f"write_x0 must be True or False, got {write_x0!r} of type {type(write_x0).__name__}")
    named = {"params": params, "grads": grads, "x0": x0, "acc": acc}
    if reg is not None:
        named["reg"] = reg
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} is a {t.layout} tensor: the stage op needs a dense (strided) buffer")
        if t.dim() != 1:
            raise ValueError(f"{name} must be a flat 1-D buffer, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous: pass a contiguous buffer ({name}.contiguous() copies)")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} is {t.dtype}; this backend supports {', '.join(map(str, dtypes))}")
        if t.dtype != params.dtype:
            raise TypeError(f"{name} is {t.dtype} but params is {params.dtype}")
        if t.device != params.device:
            raise ValueError(f"{name} is on {t.device} but params is on {params.device}")
        _check_no_grad(name, t)
    n = params.numel()
    if n == 0:
        raise ValueError("params is empty: nothing to integrate")
    for name in ("grads", "x0", "acc"):
        if named[name].numel() != n:
            raise ValueError(f"{name} has {named[name].numel()} elements but params has {n}")
    if reg is not None and reg.numel() > n:
        raise ValueError(f"reg has {reg.numel()} elements, more than params ({n})")
    segs = check_segments(segments, n)
    coeffs = as_coeffs(coeffs, len(segs), params)
    _check_no_grad("coeffs", coeffs)
    named["coeffs"] = coeffs
    outs = ["params", "acc"] + (["x0"] if write_x0 else [])
    for o in outs:
        for name, t in named.items():
            if name != o and _overlaps(named[o], t):
                raise ValueError(f"{o} (an output) overlaps {name} in memory; the stage op needs separate buffers")
    return coeffs, segs


def check_tensor_list(tensors, name: str = "tensors", dtypes=(torch.float32, torch.float64)):
    """A list of dense floating-point tensors of one dtype on one device (a single tensor is a list of one)."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    if isinstance(tensors, (str, bytes, dict)):
        raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {type(tensors).__name__}")
    try:
        tensors = list(tensors)
    except TypeError:
        raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {type(tensors).__name__}") from None
    if not tensors:
        raise ValueError(f"{name} is empty: give at least one tensor")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}, not a tensor: pass tensors (torch.as_tensor({t!r}))")
        if t.layout != torch.strided:
            raise TypeError(f"{name}[{i}] is a {t.layout} tensor: pass a dense one ({name}[{i}].to_dense())")
    dev, dt = tensors[0].device, tensors[0].dtype
    for i, t in enumerate(tensors):
        if t.device != dev:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on {dev}")
        if t.dtype != dt:
            raise TypeError(f"{name}[{i}] is {t.dtype} but {name}[0] is {dt}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name}[{i}] is {t.dtype}; supported: {', '.join(map(str, dtypes))}")
    return tensors


def reg_slices(reg: torch.Tensor | None, lo: int, hi: int):
    """The part of segment [lo, hi) that ``reg`` covers, as (reg slice, length) or (None, 0)."""
    if reg is None or reg.numel() <= lo:
        return None, 0
    m = min(hi, reg.numel())
    return reg[lo:m], m - lo


def sqnorm_backward(tensors, grad_out):
    """d/dt sum ||t||^2 = 2 t, written with differentiable ops so the backward has a gradient too."""
    return tuple(t * (2 * grad_out) for t in tensors)


def register_sqnorm_op(qualname: str) -> None:
    """Fake kernel and autograd for a compiled sqnorm op ``(Tensor[] tensors) -> Tensor``; its backward is
    sqnorm_backward, itself differentiable, so the penalty's double backward goes through it."""
    import torch

    torch.library.register_fake(qualname)(lambda tensors: tensors[0].new_empty(()))

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[0])

    def backward(ctx, grad_out):
        return (list(sqnorm_backward(ctx.saved_tensors, grad_out)),)

    torch.library.register_autograd(qualname, backward, setup_context=setup)
