"""The stepper through torch.compile. ``ODEStepper(compile=True)``: the stage op, one torch.compile'd function per kind
of stage, fed the coefficient tensor, so a change of h or lambda replays the same compiled code (no recompile in a
run). ``ODEStepper(compile="step")``: the whole step (every stage's closure call, its penalties and the stage op)
traced as one graph per kind of step (CompiledStep), the stage op inside it the same math.

The stage math is the stage op's (ops.rk_stage): k = g + e*r; acc <- a*acc + b*k; params <- x0 + c*k + d*acc. What
varies between stages and not within a run (whether acc is read, whether r is there, the segment table) is a Python
constant here, so each stage kind compiles once; what varies within a run (h, lambda) comes as tensors.
"""

from __future__ import annotations

import types

import torch

from ..contract import stage_caller
from ..flat import PopulationParams, place, view_at
from ..inductor import torch_compile

_COMPILED: dict = {}


def why_not_compiled(compile, cuda_graph: bool, distributed: bool) -> str | None:
    """Why ``compile=True`` (or ``"step"``) cannot run with these options (one line), or None when it can."""
    if compile is not True and compile is not False and compile != "step":
        return f"compile must be True, False or 'step', got {compile!r}"
    if cuda_graph:
        return (
            f"compile={compile!r} with cuda_graph=True is not supported yet (capture the eager step, or compile it "
            "alone)"
        )
    if distributed:
        return (
            f"compile={compile!r} under distributed=True is not supported yet (the per-stage all-reduce runs eagerly)"
        )
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
        fn = _COMPILED["stage"] = torch_compile(_stage, dynamic=False)
    return fn


class CompiledStages:
    """The stage op of one stepper through torch.compile: ``self(i, params, grads, x0, acc, coeffs, reg_grad)``
    (``traced``: inside a whole traced step, the plain function, which the step's trace takes in)."""

    def __init__(self, stages, segments, traced: bool = False) -> None:
        self.segments = tuple((int(lo), int(hi)) for lo, hi in segments)
        self.read_acc = tuple(st.a != 0 for st in stages)
        self.fn = _stage if traced else compiled_stage()

    def __call__(self, i: int, params, grads, x0, acc, coeffs, reg_grad=None) -> None:
        with torch.no_grad():
            self.fn(params, grads, x0, acc, coeffs, reg_grad, self.segments, self.read_acc[i])


class TracedBuffers:
    """A pair's flat buffers as its traced step (CompiledStep) touches them: only through the tensors the closure reads
    too, each parameter and its ``.grad``, and views made inside the trace of the stepper's own buffers (x0, acc, the
    decoupled step's scratch), never a whole parameter or gradient buffer. A trace that read both a buffer and its
    views would have inputs that alias a mutated one, which AOTAutograd rebuilds from a synthetic base at every call
    (merge_view_inputs: 0.6-0.9 ms of a ~3 ms toy step here); with none, it rebuilds nothing. The same stage math as
    ``_stage``, per parameter. (A population's [K, ...] member views cannot be told from overlapping ones, so its
    traced step reads the whole buffers instead, and its engine makes its views at each call: PopulationMLP.)"""

    def __init__(self, flat, stages, reg_views) -> None:
        if isinstance(flat, PopulationParams) or flat.params.storage_offset() != 0:
            raise ValueError("TracedBuffers takes a pair's FlatParams, whose buffers start their storage")
        self.nplayers = flat.nplayers
        self.read_acc = tuple(st.a != 0 for st in stages)
        # (parameter, its player, its view of r (the regulariser's buffer) or None, place(parameter): Python ints)
        self.leaves = []
        for q in range(flat.nplayers):
            params = flat.player_params(q)
            regs = reg_views if q == 0 and reg_views is not None else [None] * len(params)
            self.leaves += [(p, q, r, place(p)) for p, r in zip(params, regs)]

    def zero_grads(self) -> None:
        for leaf, *_ in self.leaves:
            leaf.grad.zero_()

    def stage(self, i: int, x0, acc, coeffs, takes_r: bool) -> None:
        """Stage ``i``'s op (``coeffs``: its [segment, 5] rows) on every leaf; r where ``takes_r``."""
        with torch.no_grad():
            for leaf, q, r, where in self.leaves:
                a, b, c, d, e = coeffs[q].unbind()
                k = leaf.grad if r is None or not takes_r else leaf.grad + e * r
                acc_v = view_at(acc, where)
                new_acc = a * acc_v + b * k if self.read_acc[i] else b * k
                acc_v.copy_(new_acc)
                leaf.copy_(view_at(x0, where) + c * k + d * new_acc)

    def decoupled(self, x0, scratch, evaluate) -> None:
        """A decoupled stage's gradients, ODEStepper._decoupled_gradients per leaf: each player's at its own stage
        point with the others at the step's start (``evaluate(q)``: player q's closure call and penalties)."""
        point, gstash = scratch
        with torch.no_grad():
            for leaf, _, _, where in self.leaves:
                view_at(point, where).copy_(leaf)
        holds = ["point"] * self.nplayers  # what each player's leaves hold now
        for q in range(self.nplayers):
            with torch.no_grad():
                for leaf, p, _, where in self.leaves:
                    if holds[p] != ("point" if p == q else "x0"):
                        leaf.copy_(view_at(point if p == q else x0, where))
                holds = ["point" if p == q else "x0" for p in range(self.nplayers)]
                self.zero_grads()
            evaluate(q)
            for leaf, p, _, where in self.leaves:
                if p == q:
                    view_at(gstash, where).copy_(leaf.grad)
        for leaf, _, _, where in self.leaves:
            leaf.grad.copy_(view_at(gstash, where))


class CompiledStep:
    """A stepper's whole step through torch.compile (``ODEStepper(compile="step")``): ``self(closure, kind)`` runs
    ``run_stages(closure, kind)``, the step's device work, as one graph (fullgraph: a closure that cannot be traced
    is a RuntimeError naming why, never a silent fallback to eager pieces).

    The first step runs eagerly: it builds what a trace must find built (the engine's gradient views, the
    backends' caches). ``warmup=False`` traces at the first step: the caller built them (the trainer does, so a run
    resumed from a checkpoint traces its first step as the uninterrupted run did, and rounds as it did). ``kind``
    (the penalties due) selects the graph: a lazy penalty's steps have their own. On the CPU the graph's wrapper is
    C++ (Inductor's cpp_wrapper): the step's hundred-odd matrix products are called from it, not from Python.
    """

    def __init__(self, run_stages, device, warmup: bool = True) -> None:
        self.run_stages = run_stages
        opts = {"cpp_wrapper": True} if torch.device(device).type == "cpu" else None
        # Dynamo keeps its compiled graphs on the code object (at most torch._dynamo.config.recompile_limit, 8, each
        # guarded by the stepper it traced): a copy of the code per stepper gives each its own, so the 9th stepper of
        # a process compiles as the first did, and only one stepper's kinds of step count against its limit.
        fn = run_stages.__func__
        own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        self.fn = torch_compile(types.MethodType(own, run_stages.__self__), fullgraph=True, dynamic=False, options=opts)
        self.warmed = not warmup  # (a caller that built everything itself traces at the first step: the trainer)

    def __call__(self, closure, kind: tuple[str, ...]):
        if not self.warmed:
            out = self.run_stages(closure)
            self.warmed = True
            return out
        try:
            return self.fn(stage_caller(closure), kind)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            raise RuntimeError(
                f"compile='step': this stepper has compiled {torch._dynamo.config.recompile_limit} graphs (kinds of "
                "step, or inputs that changed shape, dtype or device between steps), torch._dynamo.config."
                "recompile_limit; keep its inputs' shapes fixed, or raise that limit"
            ) from None
        except torch._dynamo.exc.Unsupported as exc:
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(
                f"compile='step' traces the whole step, the closure included, as one graph, and this closure cannot "
                f"be traced ({why}): draw its data before the step, as tensors (no torch.Generator inside), or use "
                "compile=True (the stage op alone); an exception the closure raised shows as 'Observed exception' "
                "(run the step with compile=False to see it)"
            ) from None
