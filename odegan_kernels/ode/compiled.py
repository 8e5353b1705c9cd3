"""The stepper's compiled stage op (``ODEStepper(compile=True)``): one torch.compile'd function per kind of stage, fed
the coefficient tensor, so a change of h or lambda replays the same compiled code (no recompile in a run).

The stage math is the stage op's (ops.rk_stage): k = g + e*r; acc <- a*acc + b*k; params <- x0 + c*k + d*acc. What
varies between stages and not within a run (whether acc is read, whether r is there, the segment table) is a Python
constant here, so each stage kind compiles once; what varies within a run (h, lambda) comes as tensors.
"""

from __future__ import annotations

import torch

_COMPILED: dict = {}


def why_not_compiled(compile, cuda_graph: bool, distributed: bool) -> str | None:
    """Why ``compile=True`` cannot run with these options (one line), or None when it can."""
    if not isinstance(compile, bool):
        return f"compile must be True or False, got {compile!r}"
    if cuda_graph:
        return "compile=True with cuda_graph=True is not supported yet (capture the eager step, or compile it alone)"
    if distributed:
        return "compile=True under distributed=True is not supported yet (the per-stage all-reduce runs eagerly)"
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    return None


def _stage(params, grads, x0, acc, coeffs, reg_grad, segments: tuple, read_acc: bool) -> None:
    for s, (lo, hi) in enumerate(segments):
        if hi == lo:
            continue
        a, b, c, d, e = coeffs[s].unbind()
        k = grads[lo:hi]
        if reg_grad is not None and reg_grad.numel() > lo:
            m = min(hi, reg_grad.numel()) - lo
            k = torch.cat([k[:m] + e * reg_grad[lo : lo + m], k[m:]])
        new_acc = a * acc[lo:hi] + b * k if read_acc else b * k
        acc[lo:hi].copy_(new_acc)
        params[lo:hi].copy_(x0[lo:hi] + c * k + d * new_acc)


def compiled_stage():
    """The compiled stage function (one per process: compiled graphs are shared by every stepper that matches)."""
    fn = _COMPILED.get("stage")
    if fn is None:
        fn = _COMPILED["stage"] = torch.compile(_stage, dynamic=False)
    return fn


class CompiledStages:
    """The stage op of one stepper through torch.compile: ``self(i, params, grads, x0, acc, coeffs, reg_grad)``."""

    def __init__(self, stages, segments) -> None:
        self.segments = tuple((int(lo), int(hi)) for lo, hi in segments)
        self.read_acc = tuple(st.a != 0 for st in stages)
        self.fn = compiled_stage()

    def __call__(self, i: int, params, grads, x0, acc, coeffs, reg_grad=None) -> None:
        with torch.no_grad():
            self.fn(params, grads, x0, acc, coeffs, reg_grad, self.segments, self.read_acc[i])
