"""FlatParams: every player's parameters and gradients as views into two contiguous buffers.

One segment per player (D first, G second); the fused stage kernels run over the whole buffer in one pass.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
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


def _named_players(players, names, named) -> tuple[list, list[str]]:
    """(players, names) from FlatParams' arguments; refuses anything that would name players by their order."""
    if named:
        if players is not None or names is not None:
            raise TypeError("give the players as keywords (FlatParams(D=..., G=...)) or a list with names=, not both")
        order = sorted(named, key=lambda k: k != "D")  # D first: the after-step penalty covers a prefix
        return [named[k] for k in order], order
    if players is None:
        raise TypeError("FlatParams needs players: FlatParams(D=disc, G=gen), or FlatParams([a, b], names=[...])")
    if isinstance(names, (nn.Module, torch.Tensor)):
        raise TypeError("FlatParams(D, G) is ambiguous: name the players, FlatParams(D=D, G=G)")
    if isinstance(players, (nn.Module, torch.Tensor)):
        players = [players]
    players = list(players)
    if not players:
        raise ValueError("FlatParams needs at least one player")
    if names is None:
        if len(players) > 1:
            raise TypeError(
                f"FlatParams got {len(players)} players without names: which is the discriminator? Name them: "
                "FlatParams(D=disc, G=gen), or FlatParams([...], names=[...])"
            )
        names = ["player0"]
    names = list(names)
    if len(names) != len(players):
        raise ValueError(f"got {len(names)} names for {len(players)} players")
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"player names must be distinct non-empty strings, got {names}")
    if "D" in names and names[0] != "D":  # the discriminator is player 0, whatever order the list gives
        i = names.index("D")
        players, names = [players[i]] + players[:i] + players[i + 1 :], ["D"] + names[:i] + names[i + 1 :]
    return players, names


class FlatParams:
    """Parameters and gradients of several players in two contiguous buffers.

    Players are named, never told apart by their order: ``FlatParams(D=disc, G=gen)``, or a list with ``names=``. A
    player named D is player 0 (first in the buffers) whatever order it was given in: the optimisers' player indices
    (``Stage.players``, the regularised player) count from D. Other games name their players as they like
    (``names=["x", "y"]``: x is player 0); a single player needs no name. After construction every ``p.data`` and
    ``p.grad`` is a view into ``self.params`` / ``self.grads``, so ``loss.backward()`` accumulates straight into the
    flat gradient buffer and ``zero_grad`` is one memset. ``segments[i] = (start, end)`` is player ``i``'s half-open
    range; segments are contiguous and cover the buffer. Modules keep their ordinary ``state_dict``.
    """

    members = 1  # one pair; PopulationParams (FlatParams(..., members=K)) holds K

    def __new__(cls, *args, members: int | None = None, **kwargs):
        if members is not None and cls is FlatParams:
            return super().__new__(PopulationParams)  # Python then runs PopulationParams.__init__
        return super().__new__(cls)

    def __init__(
        self,
        players: Sequence[nn.Module | Iterable[torch.Tensor]] | None = None,
        names: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        **named: nn.Module | Iterable[torch.Tensor],
    ) -> None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
        players, names = _named_players(players, names, named)
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
        self._install(segments, layout, [(n, m) for n, m in zip(names, players) if isinstance(m, nn.Module)])

    def _install(self, segments: list, layout: list, modules: list) -> None:
        """The two buffers for ``layout`` (self.numel long, zero padding), filled with the players' values, and
        every parameter made a view of them."""
        self.params = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.grads = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.segments: list[tuple[int, int]] = segments
        self._layout = layout
        self._checked = [e for e in layout if e.param.numel() > 0]  # an empty view has no address to check
        self._modules = modules
        self._known = {id(e.param) for e in layout}
        self._step_lock = threading.Lock()
        with torch.no_grad():
            for p, off, _ in layout:
                self.params[off : off + p.numel()].copy_(p.detach().reshape(-1))
        self._attach()

    # -- players (a population's players span one segment per member) ---------------------------------------
    @property
    def nplayers(self) -> int:
        """How many players the game has (D and G: 2); a population has one segment per member and player."""
        return len(self.segments)

    def player_params(self, player: int) -> list[torch.Tensor]:
        """The tensors autograd differentiates for ``player`` (its parameters; a population's [K, ...] ones)."""
        return self.parameters(player)

    def player_segments(self, player: int) -> list[tuple[int, int]]:
        """The segments ``player``'s parameters occupy (one; a population's, one per member)."""
        return [self.segments[player]]

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

        Gradients that user code detached from the buffer (``zero_grad(set_to_none=True)``, ``p.grad = ...``)
        are re-attached as views of it.
        """
        if player is None:
            self.grads.zero_()
        else:
            self.player_grads(player).zero_()
        self.attach_grads()

    def attach_grads(self) -> None:
        """Make every ``p.grad`` a view of the flat gradient buffer again where user code detached it."""
        base, size = self.grads.data_ptr(), self.grads.element_size()
        for p, off, _ in self._layout:
            if p.grad is None or (p.numel() > 0 and p.grad.data_ptr() != base + off * size):
                p.grad = self.grads[off : off + p.numel()].view_as(p)

    def buffers(self) -> list[torch.Tensor]:
        """The players' module buffers (BatchNorm's running statistics and counters), in a fixed order."""
        return [b for _, m in self._modules for b in m.buffers()]

    def stash_buffers(self, restore: bool = False) -> None:
        """Copy the module buffers aside (one foreach copy into tensors kept for the purpose), or put the copy
        back: an optimiser undoing an unfinished step undoes its BatchNorm updates too."""
        bufs = self.buffers()
        if not bufs:
            return
        if len(getattr(self, "_stash", ())) != len(bufs):
            self._stash = [b.detach().clone() for b in bufs]
        torch._foreach_copy_(*((bufs, self._stash) if restore else (self._stash, bufs)))

    def check(self, grads: bool = True) -> None:
        """Raise if a parameter no longer lives in the flat buffers, or a player's module now holds a
        parameter that was not flattened (``layer.weight = nn.Parameter(...)`` after flattening): either would
        be silently left untrained by the fused kernels. Then checks the gradients (``check_grads``)."""
        base_p, size = self.params.data_ptr(), self.params.element_size()
        for p, off, name in self._checked:
            if p.data_ptr() != base_p + off * size:
                raise RuntimeError(
                    f"parameter {name} no longer lives in the flat buffer: it was replaced, re-assigned, cast or moved "
                    "(.double(), .to(...)) after flattening, or another FlatParams was built over the same modules "
                    "(one owns them at a time); build a new FlatParams (and optimiser) after changing the model"
                )
        known = self._known
        for pname, m in self._modules:
            if all(id(p) in known or not p.requires_grad for p in m.parameters()):
                continue  # the common case, without building names
            name = next(n for n, p in m.named_parameters() if p.requires_grad and id(p) not in known)
            raise RuntimeError(
                f"parameter {pname}.{name} was not flattened: it was assigned after FlatParams was built "
                "(e.g. layer.weight = nn.Parameter(...)) and would never be trained; change values in "
                "place (with torch.no_grad(): layer.weight.copy_(...)) or build a new FlatParams"
            )
        if grads:
            self.check_grads()

    def check_grads(self) -> None:
        """Raise if a gradient was replaced by a tensor outside the flat buffer, or set to None, or a parameter's
        data was (``w.data = w.data.clone()``): the fused kernels would read the flat buffers and never see it. The
        optimisers call it after every closure call, so the step that would use the wrong tensor never finishes."""
        if torch.compiler.is_compiling():
            return  # a traced step (ODEStepper(compile="step")): checked eagerly after it instead
        base_p, base_g, size = self.params.data_ptr(), self.grads.data_ptr(), self.grads.element_size()
        for p, off, name in self._layout:
            if p.numel() and p.data_ptr() != base_p + off * size:
                raise RuntimeError(
                    f"parameter {name} was moved out of the flat buffer during the step (p.data = ..., .to(), a "
                    "cast): the step would not see it; change values in place (with torch.no_grad(): "
                    "p.copy_(...)) or build a new FlatParams"
                )
            g = p.grad
            if g is None:
                raise RuntimeError(
                    f"the gradient of {name} was set to None (p.grad = None or zero_grad(set_to_none=True)) while "
                    "the step needs it; zero gradients with FlatParams.zero_grad() or optimizer.zero_grad()"
                )
            if p.numel() and g.data_ptr() != base_g + off * size:
                raise RuntimeError(
                    f"the gradient of {name} was replaced by a tensor outside the flat buffer (p.grad = ..., or "
                    "out-of-place accumulation such as backward(create_graph=True)), so the step would not see "
                    "it; accumulate into it instead: p.grad.add_(g), or backward() into the existing .grad "
                    "(torch.autograd.grad for higher-order terms)"
                )

    @contextlib.contextmanager
    def stepping(self):
        """Held by an optimiser for the whole of one step: a second step of the same buffers meanwhile (a closure
        that calls step(), another optimiser or another thread) is refused rather than interleaved with it.
        Optimisers may take turns (each step starts from the parameters as they are); they may not overlap."""
        if not self._step_lock.acquire(blocking=False):
            raise RuntimeError(
                "these FlatParams are in the middle of a step already (a closure that calls step(), or another "
                "optimiser or thread stepping them): a step must finish before the next one begins"
            )
        try:
            yield
        finally:
            self._step_lock.release()

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


class PopulationParams(FlatParams):
    """K members of one pair architecture in one pair of flat buffers: ``FlatParams(D=[d_0, ...], G=[g_0, ...],
    members=K)``, each list holding the members' own modules (built alike, each from its own seed).

    Member-major: member k's players are segments ``2k`` (D) and ``2k + 1`` (G), named ``m<k>.D`` / ``m<k>.G``, so
    the fused stage op applies each member's own step size and lambda from its coefficient rows. Every member
    module's parameters are views into the buffers (sample from member k's G as from any module), and each
    parameter of the architecture is also one ``[K, ...]`` leaf (``stacked(player)``, a strided view over the
    members' copies) that batched engines differentiate: one backward of the members' summed losses accumulates
    each member's own gradient into its own segment. ``segments``, ``names`` and ``parameters(i)`` are per segment
    (the optimisers' param groups); ``nplayers``, ``player_params`` and ``player_segments`` are per player.
    """

    def __init__(self, players=None, names=None, dtype: torch.dtype = torch.float32, members=None, **named) -> None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise ValueError(f"members (the population's size) must be an int >= 1, got {members!r}")
        players, names = _named_players(players, names, named)
        per_player = []  # [player][member] -> [(name, parameter)]
        for pname, mods in zip(names, players):
            if isinstance(mods, nn.Module) or not isinstance(mods, (list, tuple)):
                raise TypeError(
                    f"a population takes each player as a list of its members' modules ({pname}=[m_0, ..., "
                    f"m_{members - 1}]), got {type(mods).__name__}"
                )
            if len(mods) != members:
                raise ValueError(f"player {pname!r} has {len(mods)} members' modules but members={members}")
            if any(not isinstance(m, nn.Module) for m in mods):
                raise TypeError(f"player {pname!r}: every member must be an nn.Module")
            plists = [_collect(m, i) for i, m in enumerate(mods)]
            if not plists[0]:
                raise ValueError(f"player {pname!r} has no trainable parameters")
            ref = [(n, p.shape, p.dtype, p.device) for n, p in plists[0]]
            for k, plist in enumerate(plists):
                got = [(n, p.shape, p.dtype, p.device) for n, p in plist]
                if got != ref:
                    raise ValueError(
                        f"member {k}'s {pname} does not match member 0's (parameter names, shapes, dtypes and "
                        "devices must agree: a population is one architecture)"
                    )
            per_player.append(plists)
        seen: set[int] = set()
        for pname, plists in zip(names, per_player):
            for k, plist in enumerate(plists):
                for name, p in plist:
                    if id(p) in seen:
                        raise ValueError(f"parameter {pname}.{name} of member {k} is shared: members never share")
                    seen.add(id(p))
                    if p.dtype != dtype:
                        raise TypeError(
                            f"parameter {pname}.{name} is {p.dtype}; FlatParams holds {dtype} "
                            f"(convert the modules, e.g. module.to({dtype}), or pass dtype=)"
                        )
        device = per_player[0][0][0][1].device
        if any(p.device != device for plists in per_player for plist in plists for _, p in plist):
            raise ValueError("a population's modules must all be on one device")
        align = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
        layout, segments, offset = [], [], 0
        for k in range(members):
            for pname, plists in zip(names, per_player):
                start = offset
                for name, p in plists[k]:
                    layout.append(FlatEntry(p, offset, f"m{k}.{pname}.{name}"))
                    offset += -(-p.numel() // align) * align
                segments.append((start, offset))
        block = offset // members  # every member occupies the same span
        self.members, self.player_names, self.block = members, list(names), block
        self.names = [f"m{k}.{n}" for k in range(members) for n in names]
        self.dtype, self.device, self.numel = dtype, device, offset
        self._install(
            segments, layout, [(f"m{k}.{n}", mods[k]) for k in range(members) for n, mods in zip(names, players)]
        )
        # one [K, ...] leaf per parameter of the architecture: member k's copy at offset + k * block
        self._stacked: list[list[tuple[str, nn.Parameter, int]]] = []
        nper = [len(plists[0]) for plists in per_player]
        for q, plists in enumerate(per_player):
            first = sum(nper[:q])
            entries = []
            for j, (name, _) in enumerate(plists[0]):
                off = layout[first + j].offset
                sp = nn.Parameter(torch.empty(0, dtype=dtype, device=device))
                entries.append((name, sp, off))
            self._stacked.append(entries)
        self._attach_stacked()
        self._stacked_buffers = [_stack_buffers(pname, mods) for pname, mods in zip(names, players)]
        # autograd notes that a [K, ...] leaf's strided gradient is not dense; accumulating into it is what we want
        warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")

    def _view(self, buf: torch.Tensor, shape, off: int) -> torch.Tensor:
        strides = torch.empty(shape, device="meta").stride()
        return buf.as_strided((self.members, *shape), (self.block, *strides), off)

    def _attach_stacked(self, grads_only: bool = False) -> None:
        shapes = [[e.param.shape for e in self.layout(q)] for q in range(self.nplayers)]  # member 0's segments
        for q, entries in enumerate(self._stacked):
            for (_, sp, off), shape in zip(entries, shapes[q]):
                if not grads_only:
                    sp.data = self._view(self.params, shape, off)
                sp.grad = self._view(self.grads, shape, off)

    @property
    def nplayers(self) -> int:
        return len(self.player_names)

    def player_params(self, player: int) -> list[torch.Tensor]:
        """Player ``player``'s [K, ...] parameters (views over every member's copy), in module order."""
        return [sp for _, sp, _ in self._stacked[player]]

    def player_segments(self, player: int) -> list[tuple[int, int]]:
        return [self.segments[k * self.nplayers + player] for k in range(self.members)]

    def views(self, buf: torch.Tensor, player: int) -> list[torch.Tensor]:
        """Player ``player``'s [K, ...] views of ``buf``, a buffer laid out as the parameters (an optimiser's own)."""
        return [view_at(buf, place(sp)) for _, sp, _ in self._stacked[player]]

    def stacked(self, player: int | str) -> dict[str, nn.Parameter]:
        """{parameter name: its [K, ...] leaf} of one player (by index or name), for torch.func.functional_call."""
        q = self.player_names.index(player) if isinstance(player, str) else player
        return {name: sp for name, sp, _ in self._stacked[q]}

    def stacked_buffers(self, player: int | str) -> dict[str, torch.Tensor]:
        """{buffer name: [K, ...] tensor} of one player (BatchNorm's running statistics, per member): the members'
        module buffers are views of these, so a batched forward that updates them updates every member's own."""
        q = self.player_names.index(player) if isinstance(player, str) else player
        return self._stacked_buffers[q]

    def attach_grads(self) -> None:
        super().attach_grads()
        base, size = self.grads.data_ptr(), self.grads.element_size()
        if any(sp.grad is None or sp.grad.data_ptr() != base + off * size for e in self._stacked for _, sp, off in e):
            self._attach_stacked(grads_only=True)

    def check_grads(self) -> None:
        super().check_grads()
        if torch.compiler.is_compiling():
            return  # checked eagerly after a traced step, as FlatParams'
        base_p, base_g, size = self.params.data_ptr(), self.grads.data_ptr(), self.grads.element_size()
        for pname, entries in zip(self.player_names, self._stacked):
            for name, sp, off in entries:
                g = sp.grad
                if sp.data_ptr() != base_p + off * size or g is None or g.data_ptr() != base_g + off * size:
                    raise RuntimeError(
                        f"the population's stacked {pname}.{name} (or its gradient) no longer views the flat "
                        "buffers: accumulate into .grad in place, never assign it"
                    )

    def __repr__(self) -> str:
        return (
            f"PopulationParams(members={self.members}, players={self.player_names}, numel={self.numel}, "
            f"dtype={self.dtype}, device={self.device})"
        )


def place(t: torch.Tensor) -> tuple:
    """Where view ``t`` lies in its buffer, as Python ints: (shape, strides, storage offset)."""
    return tuple(t.shape), t.stride(), t.storage_offset()


def view_at(buf: torch.Tensor, where: tuple) -> torch.Tensor:
    """``buf``'s view at ``where`` (place()): the same place in another buffer laid out as the first, from offset 0.
    A traced step makes its views so, inside the trace, instead of reading views made outside it: inputs that alias
    a mutated one are rebuilt from a synthetic base at every call (ode/compiled.py, TracedBuffers)."""
    return torch.as_strided(buf, *where)


def _stack_buffers(pname: str, mods) -> dict[str, torch.Tensor]:
    """Each buffer of the members' modules as one [K, ...] tensor, every member's buffer made a view of its row."""
    named = [dict(m.named_buffers()) for m in mods]
    ref = [(n, b.shape, b.dtype) for n, b in named[0].items()]
    for k, nb in enumerate(named):
        if [(n, b.shape, b.dtype) for n, b in nb.items()] != ref:
            raise ValueError(f"member {k}'s {pname} buffers do not match member 0's (names, shapes and dtypes)")
    out = {}
    for name in named[0]:
        stacked = torch.stack([nb[name].detach() for nb in named])
        for k, m in enumerate(mods):
            *path, leaf = name.split(".")
            sub = m.get_submodule(".".join(path)) if path else m
            sub._buffers[leaf] = stacked[k]
        out[name] = stacked
    return out
