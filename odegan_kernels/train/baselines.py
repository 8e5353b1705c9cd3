"""The optimiser a run asks for: the ODE stepper, or Adam / SGD behind the stepper's ``step(closure)``
interface, so the training loop has one path.

One closure call per step (Stage 0, both players); g_reg, when ``reg > 0``, and the field penalties
(``penalties``: R1, R2, WGAN-GP, consensus, lazy ones k-scaled) go through the same function as the ODE
stepper's (contract.apply_penalties), g_reg with weight ``reg``; under torchrun the flat gradients are averaged
once per step.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..contract import PENALTIES, Stage, apply_penalties, check_reg, due, penalty_specs, returned, stage_caller
from ..distributed import average_across_ranks
from ..flat import FlatParams
from ..ode.schedules import SCHEDULES
from ..ode.stepper import ODEStepper
from .config import Config
from .interrupts import critical

OPTIMIZERS = ("adam", "sgd")


class BaselineOptimizer:
    """``torch.optim.Adam`` or ``SGD`` (one param group per player) driven by the stepper's closure contract."""

    def __init__(
        self,
        flat: FlatParams,
        kind: str = "adam",
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        reg: float = 0.0,
        distributed: bool = False,
        process_group=None,
        penalties=None,
    ) -> None:
        if kind not in OPTIMIZERS:
            raise ValueError(f"kind must be one of {OPTIMIZERS}, got {kind!r}")
        self.flat = flat
        self.reg = check_reg(reg)
        self.penalties = penalty_specs(penalties)
        self.distributed, self.process_group = distributed, process_group
        self.steps = 0
        self.last_result = None  # what the last finished step returned
        groups = [{"params": flat.parameters(i)} for i in range(len(flat.segments))]
        self.optimizer = (
            torch.optim.Adam(groups, lr=lr, betas=betas) if kind == "adam" else torch.optim.SGD(groups, lr=lr)
        )

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's param groups (one per player; ``lr`` is the step size)."""
        return self.optimizer.param_groups

    def step(self, closure):
        """One gradient evaluation and one optimizer step; returns what the closure returned (detached)."""
        with self.flat.stepping():  # no second step of these buffers meanwhile
            return self._step(closure)

    def _step(self, closure):
        self.flat.zero_grad()
        everyone = tuple(range(self.flat.nplayers))  # a population's players span its members' segments
        pens = due(self.penalties, self.steps, everyone)
        if self.reg > 0:
            pens["g_reg"] = self.reg  # last: a backward over several terms sums them in a fixed order
        stage = Stage(0, self.steps, everyone, pens)
        out = stage_caller(closure)(stage)
        self.flat.check_grads()  # a closure that assigned p.grad = ... would escape the ranks' all-reduce
        apply_penalties(out, self.flat, stage.penalties, stage.players)
        if self.distributed:
            average_across_ranks(self.flat.grads, self.process_group)
        with critical():  # Adam's update cannot be undone halfway: an interrupt waits for its end
            self.optimizer.step()
            self.last_result = returned(out)
            self.steps += 1
        return self.last_result

    def state_dict(self) -> dict:
        return {**self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.steps = int(state.pop("steps", 0))
        self.optimizer.load_state_dict(state)


def build_optimizer(cfg: Config, flat: FlatParams, distributed: bool = False, traced: bool = False):
    """(the optimiser, its step-size scheduler or None): the ODE stepper with ``cfg.schedule`` as a torch
    scheduler, or an Adam/SGD baseline behind the same ``step(closure)`` (its lr stays constant). ``traced``:
    ``compile=true``'s stepper traces the whole step (the closure can be traced: GameClosure.traced)."""
    pens = {k: (getattr(cfg, k), cfg.penalty_every) for k in PENALTIES if k != "g_reg"}  # zero weights: off
    if cfg.optimizer == "ode":
        h = cfg.h if cfg.h_g is None else [cfg.h, cfg.h_g]
        stepper = ODEStepper(
            flat,
            cfg.method,
            h=h,
            reg=cfg.reg,
            reg_at=cfg.reg_at,
            coupling=cfg.coupling,
            backend=cfg.backend,
            cuda_graph=cfg.cuda_graph,
            distributed=distributed,
            penalties=pens,
            **({"compile": "step" if traced else True} if cfg.compile else {}),
        )
        return stepper, LambdaLR(stepper, SCHEDULES[cfg.schedule])
    if cfg.cuda_graph:
        raise ValueError("cuda_graph applies to the ODE stepper (optimizer='ode') only")
    return BaselineOptimizer(
        flat, cfg.optimizer, lr=cfg.lr, betas=cfg.betas, reg=cfg.reg, distributed=distributed, penalties=pens
    ), None
