"""Capture of a whole ODE-GAN step (every stage, forward, backward, the penalty's double backward, the
stage kernels, BN updates, in-graph sampling of z) in one CUDA graph, and its replay.

A step is then: the caller refreshes its static input buffers, the stepper replays. The step size lives
in the stepper's coefficient tensor, refreshed outside the graph, so replays use new values.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


class GraphCaptureError(RuntimeError):
    pass


def check_capturable(flat) -> None:
    """Refuse, with a clear message, what a CUDA graph cannot hold."""
    if flat.device is None or flat.device.type != "cuda":
        raise GraphCaptureError(
            f"cuda_graph=True needs the players' parameters on a CUDA device; they are on {flat.device}. "
            "Move the models with .cuda() before building FlatParams, or leave cuda_graph off"
        )
    if not torch.cuda.is_available():
        raise GraphCaptureError("cuda_graph=True needs CUDA, which this torch build cannot use here")


def capture_error(exc: Exception) -> GraphCaptureError:
    """A failed capture's error, saying what most likely caused it and keeping the original message."""
    msg = str(exc)
    first = f"{type(exc).__name__}: {msg.splitlines()[0] if msg else ''}"
    if any(k in msg for k in ("not permitted when stream is capturing", "StreamCaptureUnsupported", "synchroniz")):
        return GraphCaptureError(
            "the step could not be captured: something in it synchronises with the host (.item(), printing or "
            "testing a tensor's value, a copy from pageable CPU memory, a data-dependent shape). cuda_graph=True "
            f"needs a closure that only launches GPU work. The error was: {first}"
        )
    return GraphCaptureError(f"the step could not be captured. The error was: {first}")


class _Variant:
    """One kind of step's capture: its warm-up count, graph, static outputs and the closure it recorded."""

    __slots__ = ("warmed", "graph", "outputs", "code")

    def __init__(self) -> None:
        self.warmed, self.graph, self.outputs, self.code = 0, None, None, None


class StepGraph:
    """Runs ``run_step(closure)`` eagerly ``warmup`` times on a side stream, then captures and replays it.

    The closure is captured once: replays repeat exactly the recorded work, so its inputs must live in
    static tensors that the caller refills before each step (a different closure, or inputs of another
    shape, need a new capture: ``reset()``).

    Steps that do different work (a lazy penalty due every k-th step) pass a ``key`` naming their kind: each
    key is warmed up, captured and replayed on its own graph, so a step never replays another kind's work.
    """

    def __init__(self, run_step: Callable, warmup: int = 3) -> None:
        if warmup < 1:
            raise ValueError("warmup must be >= 1: the first eager step builds caches and autograd state")
        self.run_step = run_step
        self.warmup = warmup
        self.variants: dict[Hashable, _Variant] = {}
        self.stream: torch.cuda.Stream | None = None

    def reset(self) -> None:
        """Forget every capture: the next steps warm up and capture again."""
        self.variants = {}

    @property
    def captured(self) -> bool:
        """Whether any kind of step has been captured."""
        return any(v.graph is not None for v in self.variants.values())

    def __call__(self, closure, key: Hashable = None):
        code = getattr(closure, "__code__", None) or type(closure)
        v = self.variants.setdefault(key, _Variant())
        if v.graph is not None:
            if code is not v.code:
                raise GraphCaptureError(
                    "this stepper replays the closure it captured; a different closure needs a new capture "
                    "(call stepper.graph.reset())"
                )
            v.graph.replay()
            return v.outputs
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        if v.warmed < self.warmup:
            # Real steps, on a side stream as torch.cuda.graphs asks: they build Triton's compiled kernels,
            # autograd's state and every cached table before capture.
            self.stream.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(self.stream):
                    out = self.run_step(closure)
            finally:  # also after a failure: the caller's rollback must come after the side stream's work
                torch.cuda.current_stream().wait_stream(self.stream)
            v.warmed += 1
            return out
        graph, out = torch.cuda.CUDAGraph(), None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        # Inside the stream context, so a failed capture never leaves the side stream current; thread_local, so
        # another thread's CUDA calls (a DataLoader's pin-memory thread) do not break the capture. Each kind
        # of step has its own graph and memory pool: the kinds replay in any order.
        with torch.cuda.stream(self.stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                out = self.run_step(closure)
            except BaseException as exc:
                self._abandon(graph, v, end=True)
                if not isinstance(exc, RuntimeError):
                    raise  # the closure's own errors (and KeyboardInterrupt) as they are
                raise capture_error(exc) from exc
            try:
                graph.capture_end()
            except RuntimeError as exc:
                self._abandon(graph, v, end=False)
                raise capture_error(exc) from exc
        v.graph, v.outputs, v.code = graph, out, code
        graph.replay()  # capture records without running: this step still has to happen
        return out

    def _abandon(self, graph, v: _Variant, end: bool) -> None:
        """After a failed capture: end it (what that raises is not the error that matters), free the graph, and
        drop the side stream, warming this kind up again on a fresh one next time. If capture_end raised before
        torch stopped routing the stream's allocations to the graph's private pool, later allocations on that
        stream would land in a dead pool; no later work runs on it."""
        for call in (graph.capture_end, graph.reset) if end else (graph.reset,):
            try:
                call()
            except Exception:
                pass  # the capture is invalid after a failure
        self.stream = None
        v.warmed = 0


class StaticBatches:
    """Graph mode's real data: one static slot per stage that draws a batch (and its labels), refilled from
    the data pipeline before each replay, so the captured step reads new data at fixed addresses."""

    def __init__(
        self, slots: int, batch: int, sample_shape: tuple[int, ...], labels: bool, device, dtype=torch.float32
    ) -> None:
        # sized from the problem's sample_shape: drawing a batch here would consume data
        self.x = torch.empty((slots, batch, *sample_shape), device=device, dtype=dtype)
        self.y = torch.zeros((slots, batch), dtype=torch.long, device=device) if labels else None

    def fill(self, draw: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Refill every slot with ``draw()``'s (batch, labels)."""
        for i in range(self.x.shape[0]):
            x, y = draw()
            self.x[i].copy_(x, non_blocking=True)
            if self.y is not None:
                self.y[i].copy_(y, non_blocking=True)

    def slot(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.x[i], (None if self.y is None else self.y[i])
