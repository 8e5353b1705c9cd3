"""Butcher tableaus compiled into fused stage-op calls, and the closure-based ODE-GAN stepper.

A step integrates d(theta, phi)/dt = -grad of each player's own loss with an explicit Runge-Kutta method,
using two buffers beyond params and grads (x0: the step's start, acc: the running weighted sum).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import ops
from .flat import FlatParams

COUPLINGS = ("joint", "decoupled")
PENALTY_PLACEMENTS = ("first_stage", "after_step")


@dataclass(frozen=True)
class Tableau:
    """An explicit Butcher tableau. ``A[i]`` holds the weights of stages 0..i for stage point i+1."""

    name: str
    A: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int

    @property
    def stages(self) -> int:
        return len(self.b)

    def stability(self, z: complex) -> complex:
        """R(z): the factor one step multiplies an eigen-direction of y' = lambda*y by, z = h*lambda."""
        s = self.stages
        import numpy as np

        A = np.zeros((s, s), dtype=complex)
        for i, row in enumerate(self.A):
            A[i + 1, : len(row)] = row
        b = np.array(self.b, dtype=complex)
        return complex(1 + z * b @ np.linalg.solve(np.eye(s) - z * A, np.ones(s)))


TABLEAUS: dict[str, Tableau] = {
    t.name: t
    for t in (
        Tableau("euler", (), (1.0,), 1),
        Tableau("heun", ((1.0,),), (0.5, 0.5), 2),
        Tableau("midpoint", ((0.5,),), (0.0, 1.0), 2),
        Tableau("ralston", ((2 / 3,),), (0.25, 0.75), 2),
        Tableau("rk3", ((0.5,), (-1.0, 2.0)), (1 / 6, 2 / 3, 1 / 6), 3),
        Tableau("rk4", ((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6), 4),
    )
}


@dataclass(frozen=True)
class StageCoeffs:
    """Stage-op scalars for unit step size: the op gets (a, b, -h*c, -h*d, e)."""

    a: float
    b: float
    c: float
    d: float


def compile_tableau(tab: Tableau) -> list[StageCoeffs]:
    """Express a tableau as low-storage stages: acc = a*acc + b*k; point = x0 - h*(c*k + d*acc).

    acc after stage i is sum_{j<=i} b_j k_j, so stage point i+1 must weigh earlier stages in proportion
    to b (true of every tableau in TABLEAUS). Anything else raises ValueError.
    """
    s = tab.stages
    if len(tab.A) != s - 1 or any(len(row) != i + 1 for i, row in enumerate(tab.A)):
        raise ValueError(f"tableau {tab.name!r}: A must have rows of length 1..{s - 1}")
    out = []
    for i in range(s):
        a = 0.0 if i == 0 else 1.0
        if i == s - 1:
            out.append(StageCoeffs(a, tab.b[i], 0.0, 1.0))
            continue
        row = tab.A[i]
        delta = None
        for j in range(i):
            if tab.b[j] != 0:
                ratio = row[j] / tab.b[j]
                if delta is None:
                    delta = ratio
                elif not math.isclose(delta, ratio, rel_tol=1e-12, abs_tol=1e-15):
                    raise ValueError(f"tableau {tab.name!r} is not expressible with two registers")
            elif row[j] != 0:
                raise ValueError(f"tableau {tab.name!r} is not expressible with two registers")
        delta = 0.0 if delta is None else delta
        out.append(StageCoeffs(a, tab.b[i], row[i] - delta * tab.b[i], delta))
    return out


def get_tableau(method: str | Tableau) -> Tableau:
    if isinstance(method, Tableau):
        return method
    if method not in TABLEAUS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(TABLEAUS)}")
    return TABLEAUS[method]


@dataclass(frozen=True)
class Stage:
    """What the stepper asks of one closure call.

    index: stage within the step (0 is the step's start point); step: steps taken before this one;
    players: the players whose gradients the closure must fill (all of them unless coupling is
    decoupled); penalty: the closure must return {"penalty": ||dl_G/dphi||^2} as a scalar that autograd
    can differentiate with respect to the regularised player's parameters.
    """

    index: int
    step: int
    players: tuple[int, ...]
    penalty: bool


def constant(step: int) -> float:
    return 1.0


def cifar_schedule(step: int, warmup: int = 500, decay_after: int = 400_000) -> float:
    """The CIFAR-10 reference's step-size multiplier: 1/4 for the first 500 steps, 1/2 after 400k."""
    if step < warmup:
        return 0.25
    if step >= decay_after:
        return 0.5
    return 1.0


SCHEDULES: dict[str, Callable[[int], float]] = {"constant": constant, "cifar": cifar_schedule}


def average_across_ranks(buf: torch.Tensor, group=None) -> None:
    """In place: the mean of ``buf`` over the ranks (a sum all-reduce and a division: gloo has no AVG)."""
    import torch.distributed as dist

    dist.all_reduce(buf, group=group)
    buf.div_(dist.get_world_size(group))


class ODEStepper:
    """ODE-GAN's optimiser: one explicit Runge-Kutta step of the players' gradient field per ``step``.

    Follows torch.optim's closure convention: ``step(closure)`` calls ``closure(stage)`` once per stage
    (a closure taking no argument is accepted when no penalty is asked for). Before each call the stepper
    zeroes the gradients (one memset); the closure only has to accumulate each player's own-loss
    gradient at the current parameters into ``.grad``.

    Options reproduce the two reference implementations of the paper (its CIFAR-10 code and its colab):
    ``coupling`` joint | decoupled, ``penalty`` first_stage | after_step; the data per stage is the
    closure's choice (``Stage.index`` tells it which stage it serves).
    """

    def __init__(
        self,
        flat: FlatParams,
        method: str | Tableau = "rk4",
        h: float | Sequence[float] = 0.04,
        reg: float = 0.0,
        penalty: str = "first_stage",
        coupling: str = "joint",
        schedule: str | Callable[[int], float] = "constant",
        regularised: int | str = 0,
        backend: str = "auto",
        cuda_graph: bool = False,
        graph_warmup: int = 3,
        distributed: bool = False,
        process_group=None,
    ) -> None:
        self.flat = flat
        self.tableau = get_tableau(method)
        self._stages = compile_tableau(self.tableau)
        nseg = len(flat.segments)
        hs = [float(h)] * nseg if isinstance(h, (int, float)) else [float(x) for x in h]
        if len(hs) != nseg:
            raise ValueError(f"h has {len(hs)} step sizes for {nseg} players")
        if any(not math.isfinite(x) or x <= 0 for x in hs):
            raise ValueError(f"step sizes must be positive and finite, got {hs}")
        if not math.isfinite(reg) or reg < 0:
            raise ValueError(f"reg (the regulariser weight lambda) must be >= 0, got {reg}")
        if penalty not in PENALTY_PLACEMENTS:
            raise ValueError(f"penalty must be one of {PENALTY_PLACEMENTS}, got {penalty!r}")
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        if isinstance(schedule, str):
            if schedule not in SCHEDULES:
                raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
            schedule = SCHEDULES[schedule]
        if reg > 0 and penalty == "first_stage" and self.tableau.b[0] == 0:
            raise ValueError(
                f"method {self.tableau.name!r} gives the first stage no weight (b1 = 0), so the "
                "penalty cannot be folded into it; use penalty='after_step'"
            )
        self.h = hs
        self.reg = float(reg)
        self.penalty = penalty
        self.coupling = coupling
        self.schedule = schedule
        self.regularised = flat._index(regularised)
        self.backend = backend
        self.steps = 0

        dev, dt = flat.device, flat.dtype
        self.x0 = flat.params.clone()
        self.acc = torch.zeros_like(flat.params)
        lo, hi = flat.segments[self.regularised]
        self._reg_buf = None
        if reg > 0 and penalty == "after_step":
            if lo != 0:
                raise ValueError("the after-step penalty needs the regularised player first in FlatParams")
            self._reg_buf = torch.zeros(hi, dtype=dt, device=dev)  # r covers D's segment only
        self._coeffs = torch.zeros(len(self._stages), nseg, 5, dtype=dt, device=dev)
        self._scale = None
        self._versions = None
        self._scratch = None
        self._closure_takes_stage: dict[int, bool] = {}
        self.distributed = distributed
        self.process_group = process_group
        if distributed:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "distributed=True needs torch.distributed initialised first (torchrun, or dist.init_process_group)"
                )
        self.graph = None
        if cuda_graph:
            from .graphs import StepGraph, check_capturable

            check_capturable(flat)
            self.graph = StepGraph(self._run_stages, warmup=graph_warmup)

    # -- coefficients -------------------------------------------------------------------------------------
    @property
    def penalty_weight(self) -> float:
        """The weight the regulariser's gradient gets inside its stage's gradient."""
        b = self.tableau.b[0] if self.penalty == "first_stage" else self.tableau.b[-1]
        return self.reg / b if self.reg > 0 else 0.0

    def _refresh_coeffs(self) -> None:
        scale = float(self.schedule(self.steps))
        if scale == self._scale:
            return  # nothing to copy: the common case costs no device work
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"schedule returned {scale} at step {self.steps}; it must be positive")
        rows = []
        last = len(self._stages) - 1
        for i, st in enumerate(self._stages):
            seg_rows = []
            for s, h in enumerate(self.h):
                hh = h * scale
                e = 0.0
                if i == last and self._reg_buf is not None and s == self.regularised:
                    e = self.penalty_weight
                seg_rows.append((st.a, st.b, -hh * st.c, -hh * st.d, e))
            rows.append(seg_rows)
        # In place: a captured graph holds this tensor's address and replays with its new values.
        self._coeffs.copy_(torch.tensor(rows, dtype=self._coeffs.dtype))
        self._scale = scale

    # -- x0 bookkeeping -------------------------------------------------------------------------------
    def _param_versions(self) -> int:
        return sum(p._version for p in self.flat.parameters())

    def sync(self) -> None:
        """Take the parameters as they are now as the next step's start point."""
        self.x0.copy_(self.flat.params)  # outside any graph: the captured step never reads params first
        self._versions = self._param_versions()

    # -- the step --------------------------------------------------------------------------------------
    def _call(self, closure, stage: Stage):
        key = getattr(closure, "__code__", None) or type(closure)
        if key not in self._closure_takes_stage:
            try:
                n = len(inspect.signature(closure).parameters)
            except (TypeError, ValueError):
                n = 1
            self._closure_takes_stage[key] = n > 0
        if self._closure_takes_stage[key]:
            return closure(stage)
        if stage.penalty:
            raise TypeError(
                "the penalty needs a closure that takes the Stage argument and returns "
                "{'penalty': ...} when stage.penalty is set"
            )
        return closure()

    def _apply_penalty(self, out) -> None:
        if isinstance(out, dict) and "penalty_grad" in out:
            self._apply_penalty_grad(out.pop("penalty_grad"))
            return
        if not isinstance(out, dict) or "penalty" not in out:
            raise TypeError(
                "with reg > 0 the closure must return a dict with key 'penalty' at stages where "
                "stage.penalty is True (the value ||dl_G/dphi||^2, differentiable w.r.t. D), or "
                "'penalty_grad' (its gradient, one tensor per D parameter)"
            )
        pen = out.pop("penalty")
        if not isinstance(pen, torch.Tensor) or pen.dim() != 0 or pen.grad_fn is None:
            raise TypeError(
                "closure's 'penalty' must be a 0-dim tensor with a graph to D's parameters "
                "(compute dl_G/dphi with torch.autograd.grad(create_graph=True))"
            )
        params = self.flat.parameters(self.regularised)
        if self.penalty == "first_stage":
            # Accumulates in place into the flat gradient buffer (no graph is built by this backward).
            (pen * self.penalty_weight).backward(inputs=params)
        else:
            self._apply_penalty_grad(torch.autograd.grad(pen, params, materialize_grads=True))
        out["penalty"] = pen.detach()

    def _apply_penalty_grad(self, grads) -> None:
        """The regulariser's gradient given directly (finite-difference or jvp penalty)."""
        params = self.flat.parameters(self.regularised)
        grads = list(grads)
        if len(grads) != len(params) or any(g.shape != p.shape for g, p in zip(grads, params)):
            raise ValueError(
                "'penalty_grad' must hold one tensor per parameter of the regularised player, shaped like it"
            )
        if self.penalty == "first_stage":
            torch._foreach_add_([p.grad for p in params], grads, alpha=self.penalty_weight)
        else:
            lo, _ = self.flat.segments[self.regularised]
            for p, g, (_, off, _) in zip(params, grads, self._layout_of(self.regularised)):
                self._reg_buf[off - lo : off - lo + p.numel()].copy_(g.reshape(-1))

    def _layout_of(self, player: int):
        lo, hi = self.flat.segments[player]
        return [item for item in self.flat._layout if lo <= item[1] < hi]

    def step(self, closure) -> dict:
        """Advance one step; returns what the closure returned at stage 0 (detached).

        With ``cuda_graph=True`` the returned tensors are the graph's static outputs: the next replay
        overwrites them (clone what you keep).
        """
        self.flat.check()
        if self._versions is None or self._param_versions() != self._versions:
            self.sync()
        self._refresh_coeffs()  # outside any graph: replays read the coefficient tensor
        try:
            first = self.graph(closure) if self.graph is not None else self._run_stages(closure)
        except BaseException:
            # A failure or Ctrl-C mid-step leaves params at a stage point; x0 still holds the step's start
            # (only the last stage op overwrites it), so put the parameters back there.
            self.flat.params.copy_(self.x0)
            raise
        self.steps += 1
        self._versions = self._param_versions()
        return first

    def _run_stages(self, closure) -> dict:
        """The device work of one step: every stage's closure call and fused stage op."""
        flat = self.flat
        nstages = len(self._stages)
        nplayers = len(flat.segments)
        everyone = tuple(range(nplayers))
        first: dict = {}
        for i in range(nstages):
            want_pen = i == 0 and self.reg > 0
            if self.coupling == "joint" or i == 0:
                flat.zero_grad()
                out = self._call(closure, Stage(i, self.steps, everyone, want_pen))
                if want_pen:
                    self._apply_penalty(out)
            else:
                self._decoupled_gradients(closure, i)
                out = None
            if self.distributed:
                self._average_across_ranks(last_stage=i == nstages - 1)
            if i == 0:
                first = (
                    {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in (out or {}).items()}
                    if isinstance(out, dict)
                    else {}
                )
            last = i == nstages - 1
            ops.rk_stage(
                flat.params,
                flat.grads,
                self.x0,
                self.acc,
                self._coeffs[i],
                flat.segments,
                reg=self._reg_buf if last else None,
                write_x0=last,
                backend=self.backend,
            )
        return first

    def _average_across_ranks(self, last_stage: bool) -> None:
        """Data parallel: one all-reduce of the flat gradient buffer per stage (the regulariser already in
        it), and of the after-step regulariser buffer once per step, averaged over the ranks."""
        average_across_ranks(self.flat.grads, self.process_group)
        if last_stage and self._reg_buf is not None:
            average_across_ranks(self._reg_buf, self.process_group)

    def _decoupled_gradients(self, closure, i: int) -> None:
        """Each player's gradient at its own stage point with every other player at the step's start."""
        flat = self.flat
        if self._scratch is None:
            self._scratch = (torch.empty_like(flat.params), torch.empty_like(flat.grads))
        point, gstash = self._scratch
        point.copy_(flat.params)
        holds = ["point"] * len(flat.segments)  # what each segment of params holds now
        for q, (lo, hi) in enumerate(flat.segments):
            for s, (a, b) in enumerate(flat.segments):  # copy only the segments that change
                want = "point" if s == q else "x0"
                if holds[s] != want:
                    flat.params[a:b].copy_((point if s == q else self.x0)[a:b])
                    holds[s] = want
            flat.zero_grad()
            self._call(closure, Stage(i, self.steps, (q,), False))
            gstash[lo:hi].copy_(flat.grads[lo:hi])
        flat.grads.copy_(gstash)
        # params are left as they are: the stage op that follows writes every one without reading it

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "h": list(self.h),
            "reg": self.reg,
            "method": self.tableau.name,
            "penalty": self.penalty,
            "coupling": self.coupling,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("method", "penalty", "coupling"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(
                    f"checkpoint was made with {key}={state[key]!r} but this stepper has "
                    f"{key}={self.state_dict()[key]!r}"
                )
        self.steps = int(state["steps"])
        self.h = [float(x) for x in state["h"]]
        self.reg = float(state["reg"])
        self._scale = None
        self._versions = None  # take the (possibly reloaded) parameters as the next start point
