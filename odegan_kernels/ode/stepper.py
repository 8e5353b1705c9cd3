"""The closure-based ODE-GAN stepper: one explicit Runge-Kutta step of the players' gradient field per call.

A step integrates d(theta, phi)/dt = -grad of each player's own loss with an explicit Runge-Kutta method,
using two buffers beyond params and grads (x0: the step's start, acc: the running weighted sum).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import ops
from ..distributed import average_across_ranks
from ..flat import FlatParams
from .schedules import SCHEDULES
from .tableau import Tableau, compile_tableau, get_tableau

COUPLINGS = ("joint", "decoupled")
PENALTY_PLACEMENTS = ("first_stage", "after_step")


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
            from ..graphs import StepGraph, check_capturable

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
