"""FlatParams: every player's parameters and gradients as views into two contiguous buffers.

One segment per player (D first, G second); the fused stage kernels run over the whole buffer in one pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import nn

ALIGN_BYTES = 16  # every tensor starts on a 16-byte boundary, so kernels can use vector loads


def _collect(player: nn.Module | Iterable[torch.Tensor], index: int) -> list[tuple[str, nn.Parameter]]:
    if isinstance(player, nn.Module):
        named = list(player.named_parameters())
    else:
        named = [(str(i), p) for i, p in enumerate(player)]
    out = []
    for name, p in named:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"player {index}: parameter {name!r} is a {type(p).__name__}, not a tensor")
        if not p.requires_grad:
            continue  # frozen parameters are not part of the dynamics
        out.append((name, p))
    return out


class FlatEntry(NamedTuple):
    """Where one parameter lives: ``flat.params[offset : offset + param.numel()]``; ``name`` is
    ``<player>.<parameter name>``."""

    param: nn.Parameter
    offset: int
    name: str


class FlatParams:
    """Parameters and gradients of several players in two contiguous buffers.

    After construction every ``p.data`` and ``p.grad`` is a view into ``self.params`` / ``self.grads``,
    so ``loss.backward()`` accumulates straight into the flat gradient buffer and ``zero_grad`` is one
    memset. ``segments[i] = (start, end)`` is player ``i``'s half-open range; segments are contiguous and
    cover the buffer. Modules keep their ordinary ``state_dict``.
    """

    def __init__(
        self,
        players: Sequence[nn.Module | Iterable[torch.Tensor]],
        names: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if len(players) == 0:
            raise ValueError("FlatParams needs at least one player")
        names = (
            list(names)
            if names is not None
            else (["D", "G"] if len(players) == 2 else [f"player{i}" for i in range(len(players))])
        )
        if len(names) != len(players):
            raise ValueError(f"got {len(names)} names for {len(players)} players")
        self.names = names
        self.dtype = dtype
        align = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())

        per_player = [_collect(p, i) for i, p in enumerate(players)]
        owner: dict[int, str] = {}
        device = None
        for pname, plist in zip(names, per_player):
            if not plist:
                raise ValueError(f"player {pname!r} has no trainable parameters")
            for name, p in plist:
                key = id(p)
                if key in owner:
                    where = owner[key]
                    if where.split(".", 1)[0] != pname:
                        raise ValueError(
                            f"parameter {pname}.{name} is shared with {where}: a tensor must belong to one "
                            "player only (each player is integrated with its own step size)"
                        )
                    raise ValueError(f"parameter {pname}.{name} appears twice in player {pname!r}")
                owner[key] = f"{pname}.{name}"
                if p.dtype != dtype:
                    raise TypeError(
                        f"parameter {pname}.{name} is {p.dtype}; FlatParams holds {dtype} "
                        f"(convert the module, e.g. module.to({dtype}), or pass dtype=)"
                    )
                if device is None:
                    device = p.device
                elif p.device != device:
                    raise ValueError(
                        f"parameter {pname}.{name} is on {p.device} but earlier ones are on {device}: "
                        "move every player to one device before flattening"
                    )

        # Lay out: each tensor starts aligned; padding stays zero in both buffers.
        layout: list[FlatEntry] = []
        segments = []
        offset = 0
        for pname, plist in zip(names, per_player):
            start = offset
            for name, p in plist:
                layout.append(FlatEntry(p, offset, f"{pname}.{name}"))
                offset += -(-p.numel() // align) * align
            segments.append((start, offset))
        self.numel = offset
        self.device = device
        self.params = torch.zeros(offset, dtype=dtype, device=device)
        self.grads = torch.zeros(offset, dtype=dtype, device=device)
        self.segments: list[tuple[int, int]] = segments
        self._layout = layout
        with torch.no_grad():
            for p, off, _ in layout:
                self.params[off : off + p.numel()].copy_(p.detach().reshape(-1))
        self._attach()

    # -- views ------------------------------------------------------------------------------------------
    def _attach(self) -> None:
        for p, off, _ in self._layout:
            n = p.numel()
            p.data = self.params[off : off + n].view_as(p)
            p.grad = self.grads[off : off + n].view_as(p)

    def parameters(self, player: int | str | None = None) -> list[nn.Parameter]:
        """The flattened parameters, all of them or one player's (by index or name)."""
        return [e.param for e in self.layout(player)]

    def layout(self, player: int | str | None = None) -> list[FlatEntry]:
        """(parameter, offset, name) of every flattened parameter, all players' or one player's, in order."""
        if player is None:
            return list(self._layout)
        lo, hi = self.segments[self.index(player)]
        return [e for e in self._layout if lo <= e.offset < hi]

    def segment(self, player: int | str) -> tuple[int, int]:
        """Player ``player``'s half-open range ``(start, end)`` in the flat buffers."""
        return self.segments[self.index(player)]

    def player_grads(self, player: int | str) -> torch.Tensor:
        lo, hi = self.segment(player)
        return self.grads[lo:hi]

    def index(self, player: int | str) -> int:
        """A player's position (0 for the first), from its index or its name."""
        if isinstance(player, bool) or not isinstance(player, (int, str)):
            raise TypeError(f"player must be an index or a name, got {player!r}")
        if isinstance(player, str):
            if player not in self.names:
                raise KeyError(f"no player named {player!r}; players are {self.names}")
            return self.names.index(player)
        if not 0 <= player < len(self.segments):
            raise IndexError(f"player index {player} out of range for {len(self.segments)} players")
        return player

    # -- gradient handling ------------------------------------------------------------------------------
    def zero_grad(self, player: int | str | None = None) -> None:
        """One memset over the flat gradient buffer (or one player's segment).

        Gradients that user code detached from the buffer (``zero_grad(set_to_none=True)``) are re-attached.
        """
        if player is None:
            self.grads.zero_()
        else:
            self.player_grads(player).zero_()
        for p, off, _ in self._layout:
            if p.grad is None:
                p.grad = self.grads[off : off + p.numel()].view_as(p)

    def check(self) -> None:
        """Raise if a parameter or gradient no longer lives in the flat buffers.

        Catches a module whose parameters were replaced or re-assigned after flattening, and gradients
        replaced by out-of-place accumulation (e.g. ``backward(create_graph=True)``), which would
        otherwise be silently ignored by the fused kernels.
        """
        base_p, base_g = self.params.data_ptr(), self.grads.data_ptr()
        size = self.params.element_size()
        for p, off, name in self._layout:
            if p.data_ptr() != base_p + off * size:
                raise RuntimeError(
                    f"parameter {name} no longer lives in the flat buffer (it was replaced or re-assigned "
                    "after flattening); build a new FlatParams after changing the model"
                )
            if p.grad is not None and p.grad.data_ptr() != base_g + off * size:
                raise RuntimeError(
                    f"gradient of {name} was replaced by a tensor outside the flat buffer (out-of-place "
                    "accumulation, e.g. backward(create_graph=True)); use torch.autograd.grad for "
                    "higher-order terms, or call FlatParams.zero_grad() before backward"
                )

    def check_modules(self, *modules: nn.Module) -> None:
        """Raise if a module now holds parameters that were not flattened (replaced after flattening)."""
        known = {id(p) for p, _, _ in self._layout}
        for m in modules:
            for name, p in m.named_parameters():
                if p.requires_grad and id(p) not in known:
                    raise RuntimeError(
                        f"module parameter {name!r} was not flattened (replaced after FlatParams was "
                        "built); build a new FlatParams after changing the model"
                    )
        self.check()

    def __repr__(self) -> str:
        segs = ", ".join(f"{n}=[{a},{b})" for n, (a, b) in zip(self.names, self.segments))
        return f"FlatParams(numel={self.numel}, {segs}, dtype={self.dtype}, device={self.device})"
