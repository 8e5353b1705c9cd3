"""G's weight average: an exponential moving average of the generator's flat segment, updated after every step
with ops.ema_update, saved with the run, and swapped into G for samples, plots and FID."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .. import ops
from ..flat import FlatParams


class GeneratorAverage:
    """The average ``avg`` of G's parameters (its segment of the flat buffer), with ``decay`` = cfg.ema (0: off,
    and then every method does nothing).

    ``update(step)``, after each step: while ``step <= start`` (cfg.ema_start) the average is a copy of G's
    parameters, after that ``avg <- decay*avg + (1-decay)*params`` (ops.ema_update on ``backend``).
    ``evaluating(G)`` puts G in eval mode with the average in its parameters, and afterwards puts the trained
    values back bit for bit (and G's mode), so training goes on undisturbed. Only parameters are averaged:
    BatchNorm running statistics (buffers) stay the trained model's, so a BN generator is evaluated with its
    trained statistics under averaged weights. ``player``: the segment averaged (a population's member k: "m<k>.G",
    its own average, updated at its own step count).
    """

    def __init__(self, flat: FlatParams, decay: float, start: int = 0, backend: str = "auto", player="G") -> None:
        self.decay, self.start, self.backend = float(decay), int(start), backend
        lo, hi = flat.segment(player)  # a population's member k: player "m<k>.G"
        self.params = flat.params[lo:hi]  # a view: always G's current parameters
        self.avg = self.params.detach().clone() if self.decay > 0 else None
        self._saved: torch.Tensor | None = None  # the trained parameters while the average is swapped in

    @property
    def enabled(self) -> bool:
        return self.avg is not None

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in G's parameters after finishing step ``step`` (1 for the first)."""
        if self.avg is None:
            return
        if step <= self.start:
            self.avg.copy_(self.params)
        else:
            ops.ema_update(self.avg, self.params, self.decay, backend=self.backend)

    @contextmanager
    def swapped_in(self):
        """G's parameters hold the average inside (nested uses swap once); the trained values come back after."""
        outer = self.avg is not None and self._saved is None
        if outer:
            with torch.no_grad():
                self._saved = self.params.clone()
                self.params.copy_(self.avg)
        try:
            yield
        finally:
            if outer:
                with torch.no_grad():
                    self.params.copy_(self._saved)
                self._saved = None

    @contextmanager
    def evaluating(self, G: nn.Module):
        """``swapped_in`` with G in eval mode (BN running statistics); G's mode is restored after."""
        was = G.training
        G.eval()
        try:
            with self.swapped_in():
                yield
        finally:
            G.train(was)

    def state_dict(self) -> dict:
        return {"avg": self.avg}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore the average; a checkpoint without one (written before the option existed) starts it from G's
        current parameters."""
        if self.avg is None:
            return
        avg = (state or {}).get("avg")
        with torch.no_grad():
            self.avg.copy_(self.params if avg is None else avg)
