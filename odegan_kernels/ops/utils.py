"""Input validation shared by every backend of the fused ops, so each op fails the same clear way; and the
launch helpers the compiled backends share."""

from __future__ import annotations

import math
import numbers
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


def _check_no_grad(name: str, t: torch.Tensor, op: str = "rk_stage") -> None:
    """The in-place ops write their buffers and have no derivative: with autograd recording, a tensor that
    requires grad would either be written behind autograd's back (a leaf) or lose its gradient path."""
    if t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{name} requires grad, but {op} updates flat buffers in place and is not differentiable: "
            f"pass {name}.detach() or call it under torch.no_grad() (FlatParams' buffers never require grad)"
        )


def _check_writable(name: str, t: torch.Tensor, op: str) -> None:
    """torch's rule for inference tensors, on every backend alike: written in place only inside inference_mode."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{name} is an inference tensor (made under torch.inference_mode()) and {op} writes it in place, which "
            f"torch allows only inside inference_mode: call {op} there, or pass a normal tensor ({name}.clone() "
            "outside inference mode)"
        )


def _check_flat(name: str, t, op: str, dtypes) -> None:
    """A dense, contiguous 1-D buffer of a supported dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} is a {t.layout} tensor: {op} needs a dense (strided) buffer")
    if t.dim() != 1:
        raise ValueError(f"{name} must be a flat 1-D buffer, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous: pass a contiguous buffer ({name}.contiguous() copies)")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} is {t.dtype}; this backend supports {', '.join(map(str, dtypes))}")


_VALIDATED: dict = {}  # argument signature -> (coeffs, segments) of a call that passed every check


def _signature(t) -> tuple:
    if not isinstance(t, torch.Tensor):
        return (type(t), id(t))
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad, t.layout, t.is_inference())


def check_stage_args(
    params, grads, x0, acc, coeffs, segments, reg_grad, write_x0, dtypes=(torch.float32, torch.float64)
):
    """Validate the stage op's arguments; return (coeffs tensor, segments tuple).

    An optimiser calls the op with the same buffers every stage: a call whose every argument has the signature of
    one that passed (addresses, shapes, strides, dtypes, devices, layouts, whether autograd would record) skips the
    checks.
    """
    if isinstance(coeffs, torch.Tensor) and isinstance(segments, (tuple, list)) and isinstance(write_x0, bool):
        try:
            key = (
                *(_signature(t) for t in (params, grads, x0, acc, coeffs, reg_grad)),
                tuple(tuple(s) for s in segments),
                write_x0,
                torch.is_grad_enabled(),
                torch.is_inference_mode_enabled(),
                dtypes,
            )
            hash(key)
        except (TypeError, RuntimeError):  # unhashable segments, tensors without storage: check in full
            key = None
        if key is not None and key in _VALIDATED:
            return _VALIDATED[key]
        result = _check_stage_args(params, grads, x0, acc, coeffs, segments, reg_grad, write_x0, dtypes)
        if key is not None and result[0] is coeffs:  # (only when coeffs needed no conversion)
            if len(_VALIDATED) > 64:
                _VALIDATED.clear()
            _VALIDATED[key] = result
        return result
    return _check_stage_args(params, grads, x0, acc, coeffs, segments, reg_grad, write_x0, dtypes)


def _check_stage_args(params, grads, x0, acc, coeffs, segments, reg_grad, write_x0, dtypes):
    if not isinstance(write_x0, bool):
        raise TypeError(f"write_x0 must be True or False, got {write_x0!r} of type {type(write_x0).__name__}")
    named = {"params": params, "grads": grads, "x0": x0, "acc": acc}
    if reg_grad is not None:
        named["reg_grad"] = reg_grad
    for name, t in named.items():
        _check_flat(name, t, "the stage op", dtypes)
        if t.dtype != params.dtype:
            raise TypeError(f"{name} is {t.dtype} but params is {params.dtype}")
        if t.device != params.device:
            raise ValueError(f"{name} is on {t.device} but params is on {params.device}")
        _check_no_grad(name, t)
    for name, t in (("params", params), ("acc", acc), *((("x0", x0),) if write_x0 else ())):
        _check_writable(name, t, "the stage op")
    n = params.numel()
    if n == 0:
        raise ValueError("params is empty: nothing to integrate")
    for name in ("grads", "x0", "acc"):
        if named[name].numel() != n:
            raise ValueError(f"{name} has {named[name].numel()} elements but params has {n}")
    if reg_grad is not None and reg_grad.numel() > n:
        raise ValueError(f"reg_grad has {reg_grad.numel()} elements, more than params ({n})")
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


def reg_slices(reg_grad: torch.Tensor | None, lo: int, hi: int):
    """The part of segment [lo, hi) that ``reg_grad`` covers, as (its slice, length) or (None, 0)."""
    if reg_grad is None or reg_grad.numel() <= lo:
        return None, 0
    m = min(hi, reg_grad.numel())
    return reg_grad[lo:m], m - lo


def check_ema_args(avg, params, decay, dtypes=(torch.float32, torch.float64)):
    """Validate ema_update's arguments; return ``decay`` as a float in [0, 1] or as the 0-dim tensor given.

    A tensor decay's value is checked only where reading it costs no device sync (a CPU tensor); on a GPU it is
    the caller's to keep in [0, 1] (so a captured graph can replay with a new value, read on the device)."""
    op = "ema_update"
    for name, t in (("avg", avg), ("params", params)):
        _check_flat(name, t, op, dtypes)
        _check_no_grad(name, t, op)
    _check_writable("avg", avg, op)
    if params.dtype != avg.dtype:
        raise TypeError(f"params is {params.dtype} but avg is {avg.dtype}")
    if params.device != avg.device:
        raise ValueError(f"params is on {params.device} but avg is on {avg.device}")
    if params.numel() != avg.numel():
        raise ValueError(f"params has {params.numel()} elements but avg has {avg.numel()}")
    if _overlaps(avg, params):
        raise ValueError("avg (the output) overlaps params in memory; ema_update needs separate buffers")
    if isinstance(decay, torch.Tensor):
        if decay.layout != torch.strided:
            raise TypeError(f"decay is a {decay.layout} tensor: pass a dense 0-dim tensor")
        if decay.dim() != 0:
            raise ValueError(f"decay must be a float or a 0-dim tensor, got a tensor of shape {tuple(decay.shape)}")
        if decay.dtype != avg.dtype:
            raise TypeError(f"decay is {decay.dtype} but avg is {avg.dtype}: pass decay.to({avg.dtype})")
        if decay.device != avg.device:
            raise ValueError(f"decay is on {decay.device} but avg is on {avg.device}: pass decay.to(avg.device)")
        _check_no_grad("decay", decay, op)
        if _overlaps(avg, decay):
            raise ValueError("avg (the output) overlaps decay in memory; ema_update needs separate buffers")
        if decay.device.type == "cpu":
            _check_decay_value(float(decay))
        return decay
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"decay must be a float in [0, 1] or a 0-dim tensor, got {type(decay).__name__}")
    decay = float(decay)
    _check_decay_value(decay)
    return decay


def _check_decay_value(decay: float) -> None:
    if not math.isfinite(decay):
        raise ValueError(f"decay must be finite, in [0, 1]; got {decay!r}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1] (the weight kept by the average), got {decay!r}")


def ema_weights(decay: float, dtype: torch.dtype) -> tuple[float, float]:
    """(decay, 1 - decay) as every backend computes them for a float decay: decay rounded to the buffers' dtype,
    then 1 - decay in that dtype, so the two weights sum to one there."""
    d = torch.tensor(decay, dtype=dtype)
    return float(d), float(1 - d)


def launch_settings(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for an elementwise Triton pass over n elements: big blocks amortise index math once
    there are enough of them to fill the machine; small problems keep more programs in flight."""
    if n >= 1 << 22:
        return 4096, 8
    if n >= 1 << 16:
        return 2048, 8
    return 1024, 4


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


def device_table(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 table on the device. Built from pinned memory with a non-blocking copy, so a cache miss in
    an eager step costs no host sync. Never built inside a graph capture: the segment table is made in
    the warm-up steps, and sqnorm launches per tensor while capturing."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64, device=device)
    return torch.tensor(values, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
