"""Where a run stands beside its players and optimiser, in one value (RunState) with one state_dict: the steps it has
booked, what is still due after the last one, the log interval's sums, the random streams and the data position."""

from __future__ import annotations

import torch

from .logging import IntervalMeans


class RandomStreams:
    """The run's random streams: real-data order (CPU) and noise (on the device), one pair per rank (rank 0's
    are a single-process run's), plus the device's default generator that graph mode draws from."""

    def __init__(self, seed: int, rank: int, device) -> None:
        stream = seed * 2 + 1_000_003 * rank
        self.device = torch.device(device)
        self.data = torch.Generator(device="cpu").manual_seed(stream + 1)
        self.z = torch.Generator(device=self.device).manual_seed(stream + 2)

    def state(self) -> dict:
        cuda = self.device.type == "cuda"
        return {
            "data": self.data.get_state(),
            "z": self.z.get_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if cuda else None,
        }

    def set_state(self, state: dict) -> None:
        self.data.set_state(state["data"])
        self.z.set_state(state["z"])
        if state.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)


class RunState:
    """Where a run stands: ``step``, the steps it has booked (the optimiser counts the steps it takes; a step is
    booked when its bookkeeping is done: the schedule, the average of G, the interval's sums); ``pending``, what is
    still due after the last booked step (log, eval, plot, ckpt); ``means``, the log interval's sums; ``streams``,
    the random streams; and the data pipeline's position (``data``: anything with state_dict and
    load_state_dict, the problem)."""

    def __init__(self, streams: RandomStreams, data) -> None:
        self.step = 0
        self.pending: list[str] = []
        self.means = IntervalMeans()
        self.streams = streams
        self.data = data

    def state_dict(self) -> dict:
        """This process's part (its own random streams); a checkpoint gathers every rank's ``rng``."""
        return {
            "step": self.step,
            "pending": list(self.pending),
            "means": self.means.state_dict(),
            "rng": self.streams.state(),
            "data": self.data.state_dict(),
        }

    def load_state_dict(self, state: dict, device=None) -> None:
        """``device``: where the interval's sums live in this run (a checkpoint or a host-side copy may hold them
        elsewhere)."""
        self.data.load_state_dict(state.get("data", {}))
        self.means.load_state_dict(state.get("means", {}), device=device)
        self.pending = list(state.get("pending", []))
        self.streams.set_state(state["rng"])
        self.step = int(state["step"])

    def position(self) -> tuple[dict, dict]:
        """(the random streams, the data position) now: what an undone step must be replayed from."""
        return self.streams.state(), self.data.state_dict()

    def set_position(self, position: tuple[dict, dict]) -> None:
        rng, data = position
        self.streams.set_state(rng)
        self.data.load_state_dict(data)
