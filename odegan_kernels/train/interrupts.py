"""How a signal stops a run: at a step boundary with a checkpoint (the first Ctrl-C or SIGTERM), or at once (a
second one), but never in the middle of an update that must finish whole (a critical section)."""

from __future__ import annotations

import contextlib
import signal
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run; the message says where and which checkpoint resumes it."""


_ACTIVE: list[StopRequests] = []


@contextlib.contextmanager
def critical():
    """A stretch of bookkeeping that must finish whole (after an optimiser's step: the counters, the schedule,
    the average of G; a log row and the reset of its sums): a signal that would interrupt at once waits for its
    end. Outside a run (no handlers installed) it does nothing."""
    stop = _ACTIVE[-1] if _ACTIVE else None
    if stop is None:
        yield
        return
    stop.depth += 1
    try:
        yield
    finally:
        stop.depth -= 1
    if stop.depth == 0 and stop.deferred:
        stop.deferred = False
        raise KeyboardInterrupt


class StopRequests:
    """SIGINT / SIGTERM during a run: the first asks the loop to stop at the next step boundary (``requested``:
    the loop checkpoints and raises TrainingInterrupted); a second interrupts at once, except inside
    ``critical()``, where it waits for the section's end. ``immediate`` (torchrun): every signal interrupts at
    once. Handlers are installed only in the main thread, and restored after."""

    def __init__(self, immediate: bool = False) -> None:
        self.immediate, self.requested, self.saved = immediate, None, {}
        self.depth, self.deferred = 0, False

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
            _ACTIVE.append(self)
        return self

    def _handle(self, signum, frame) -> None:
        if self.immediate or self.requested is not None:
            if self.depth > 0:
                self.deferred = True
                return
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        if self in _ACTIVE:
            _ACTIVE.remove(self)
