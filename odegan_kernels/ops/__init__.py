"""The fused ops, one public function each, dispatched by backend.

``backend="auto" | "triton" | "csrc" | "foreach" | "reference"``; auto picks the fastest backend available
for the buffers' device (override with the environment variable ODEGAN_BACKEND) and records its choice.
"csrc" is the compiled C++/CUDA library (CPU and CUDA kernels).
"""

from __future__ import annotations

import importlib
import os

import torch

from . import foreach, reference
from .utils import check_ema_args, check_stage_args, check_tensor_list

BACKENDS = ("reference", "foreach", "triton", "csrc")
_RENAMED = {"cuda": "csrc"}  # backends renamed in 0.2 (the old name was removed in 0.3): for the message
_AUTO_ORDER = {"cuda": ("triton", "csrc", "foreach"), "cpu": ("csrc", "foreach")}
_modules = {"reference": reference, "foreach": foreach}
_unavailable: dict[str, str] = {}
choices: dict[tuple[str, str], str] = {}  # (op, device type) -> backend auto picked


def _canonical(backend: str) -> str:
    """``backend`` as given, checked to be a string (a renamed backend's old name is named in the error)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend in _RENAMED:
        raise ValueError(f"backend {backend!r} is called {_RENAMED[backend]!r} since 0.2 (the old name went in 0.3)")
    return backend


def _module(name: str):
    if name in _modules:
        return _modules[name]
    if name in _unavailable:
        return None
    modname = {"triton": ".triton_kernels", "csrc": ".csrc"}[name]
    try:
        mod = importlib.import_module(modname, __name__)
        ok, why = mod.available()
    except Exception as exc:  # a broken optional backend must not break the package
        ok, why = False, f"import failed: {exc}"
    if not ok:
        _unavailable[name] = why
        return None
    _modules[name] = mod
    return mod


def _check_backend(backend: str) -> str:
    backend = _canonical(backend)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    return backend


def why_unavailable(backend: str) -> str | None:
    """None if the backend is usable, else one line saying why not."""
    backend = _check_backend(backend)
    _module(backend)
    return _unavailable.get(backend)


def reset_backends() -> None:
    """Forget which backends were found and what auto chose, so the next call looks again: after building the
    csrc library or installing triton in a running process, or in a test that changes what is available."""
    for name in list(_modules):
        if name not in ("reference", "foreach"):
            del _modules[name]
    _unavailable.clear()
    choices.clear()


def _supports(mod, device: torch.device) -> bool:
    return getattr(mod, "supports", lambda dev: True)(device)


def supports(backend: str, device: torch.device | str) -> bool:
    """True when ``backend`` is available here and runs on tensors of ``device``'s type."""
    backend = _check_backend(backend)
    mod = _module(backend)
    return mod is not None and _supports(mod, torch.device(device))


OPS = ("stage", "sqnorm", "ema_update")


def resolve(backend: str, device: torch.device | str, op: str) -> str:
    """The backend that runs ``op`` (one of OPS) on tensors of ``device`` for ``backend=``."""
    backend = _canonical(backend)
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}; got {op!r}")
    device = torch.device(device)
    via = ""
    if backend == "auto":
        forced = os.environ.get("ODEGAN_BACKEND")
        if forced:
            forced = _canonical(forced)
            if forced not in BACKENDS:
                raise ValueError(f"ODEGAN_BACKEND={forced!r} is not one of {BACKENDS}")
            backend, via = forced, " (set by ODEGAN_BACKEND)"
        else:
            for name in _AUTO_ORDER.get(device.type, ("foreach",)):
                mod = _module(name)
                if mod is not None and _supports(mod, device) and hasattr(mod, op):
                    choices[(op, device.type)] = name
                    return name
            choices[(op, device.type)] = "foreach"
            return "foreach"
    mod = _module(backend)
    if mod is None:
        raise RuntimeError(f"backend {backend!r}{via} is unavailable: {_unavailable[backend]}")
    if not _supports(mod, device):
        raise RuntimeError(f"backend {backend!r}{via} does not run on {device.type} tensors")
    if via:
        choices[(op, device.type)] = backend
    return backend


def rk_stage(
    params,
    grads,
    x0,
    acc,
    coeffs,
    segments,
    reg_grad=None,
    write_x0: bool = False,
    backend: str = "auto",
) -> None:
    """One fused stage of a low-storage explicit Runge-Kutta step, in place over flat buffers.

    Per segment s with scalars ``coeffs[s] = (a, b, c, d, e)``::

        k = g + e*r;  acc <- a*acc + b*k;  params <- x0 + c*k + d*acc;  x0 <- params if write_x0

    ``segments`` are (start, end) int pairs covering the buffer in order, any number of them (one per player;
    empty ones allowed). ``reg_grad`` (optional) is r, the regulariser's gradient; it covers a prefix of the
    buffer (D's segment), and beyond its length r counts as zero. ``acc`` is not read where a == 0.
    ``coeffs`` is an ``[nseg, 5]`` tensor on the buffers' device (a captured CUDA graph replays with whatever
    it holds) or a nested sequence of floats.

    The op is not differentiable: with grad mode on, a tensor argument that requires grad is refused (as torch
    refuses an in-place write to a leaf); under no_grad the buffers it writes have their versions bumped, so a
    graph that saved one of them refuses its backward.
    """
    coeffs, segs = check_stage_args(params, grads, x0, acc, coeffs, segments, reg_grad, write_x0)
    name = resolve(backend, params.device, "stage")
    _modules[name].stage(params, grads, x0, acc, coeffs, segs, reg_grad=reg_grad, write_x0=write_x0)


def ema_update(avg: torch.Tensor, params: torch.Tensor, decay: float | torch.Tensor, backend: str = "auto") -> None:
    """An exponential moving average's step, in place over flat buffers: ``avg <- decay*avg + (1-decay)*params``.

    ``avg`` and ``params`` are separate contiguous 1-D buffers of one float dtype and device (any length, empty
    included); ``decay`` is a float in [0, 1] or a 0-dim tensor of their dtype on their device, read there (a
    captured CUDA graph replays with whatever it holds; its value is checked only on a CPU, where reading it
    costs no device sync). Every backend computes in the buffers' dtype: decay taken in it and 1 - decay computed
    there. NaN or inf in either buffer propagates (decay 0 still reads avg: 0*NaN is NaN).

    Not differentiable, as rk_stage: with grad mode on, a tensor argument that requires grad is refused; under
    no_grad avg's version is bumped.
    """
    decay = check_ema_args(avg, params, decay)
    name = resolve(backend, avg.device, "ema_update")
    _modules[name].ema_update(avg, params, decay)


def sqnorm(tensors, backend: str = "auto") -> torch.Tensor:
    """Sum of squared L2 norms over a list of tensors (or one tensor), in one reduction; differentiable twice.

    The tensors share one floating dtype and one device; any shape or strides, empty ones included."""
    tensors = check_tensor_list(tensors)
    name = resolve(backend, tensors[0].device, "sqnorm")
    return _modules[name].sqnorm(tensors)


__all__ = [
    "rk_stage",
    "ema_update",
    "sqnorm",
    "resolve",
    "supports",
    "why_unavailable",
    "reset_backends",
    "BACKENDS",
    "OPS",
    "choices",
]
