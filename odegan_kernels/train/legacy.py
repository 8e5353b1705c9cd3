"""Every older format in one place: checkpoints and option files written by odegan-kernels 0.1 and 0.2, as 0.3 reads
them (``migrate_checkpoint``, ``migrate_options``). Nothing else in the package reads an old format."""

from __future__ import annotations

from ..ode.schedules import SCHEDULES

FORMAT = 3  # the checkpoint format of 0.3 ("format" in the file); 0.1 and 0.2 wrote none

# options renamed since: 0.1's penalty (the placement), 0.2's penalty_at and penalty_method
RENAMED_OPTIONS = {"penalty": "reg_at", "penalty_at": "reg_at", "penalty_method": "reg_method"}
DROPPED_OPTIONS = ("extra",)  # an unused field of 0.1's config.json
RENAMED_COLUMNS = {"penalty": "g_reg"}  # metrics.jsonl's and the logs' names for g_reg's value


def migrate_options(options: dict) -> dict:
    """A run's options as 0.1 or 0.2 wrote them (config.json, a checkpoint's config) with today's names."""
    return {RENAMED_OPTIONS.get(k, k): v for k, v in options.items() if k not in DROPPED_OPTIONS}


def migrate_checkpoint(state: dict) -> dict:
    """A trainer checkpoint in the format of 0.3, from one written by 0.1, 0.2 or 0.3 (returned as it is).

    0.1 and 0.2 kept the run's position at the top (step, pending, means, rng, problem); 0.3 keeps it under "run".
    0.1's stepper state was {steps, h, reg, method, penalty, coupling} (0.2: torch.optim's state with an "ode" part
    naming the placement penalty_at); 0.1 saved no scheduler state, which 0.3 rebuilds from the step count.
    A ValueError names what a file claiming an old format lacks.
    """
    if not isinstance(state, dict):
        raise ValueError(f"a checkpoint is a dict of the run's parts, got {type(state).__name__}")
    if state.get("format") == FORMAT:
        missing = [k for k in ("run", "D", "G", "opt") if k not in state]
        if missing or not isinstance(state["run"], dict) or "rng" not in state["run"]:
            raise ValueError(f"the checkpoint lacks {', '.join(map(repr, missing or ['run.rng']))}")
        _step(state["run"].get("step"))
        return state
    if "format" in state:
        raise ValueError(f"checkpoint format {state['format']!r} is not one this version reads (0.1, 0.2 or {FORMAT})")
    missing = [k for k in ("step", "D", "G", "opt", "rng") if k not in state]
    if missing:
        raise ValueError(f"the checkpoint lacks {', '.join(map(repr, missing))}: it is not one odegan-kernels wrote")
    step = _step(state["step"])
    run = {
        "step": step,
        "pending": list(state.get("pending", [])),
        "means": _columns(state.get("means", {})),
        "rng": state["rng"],
        "data": state.get("problem", {}),
    }
    config = migrate_options(state.get("config", {}))
    schedule = SCHEDULES.get(config.get("schedule", "constant"))
    if schedule is None:
        raise ValueError(f"the checkpoint's config names an unknown schedule {config.get('schedule')!r}")
    opt, scheduler = state["opt"], state.get("scheduler")
    if isinstance(opt, dict) and "h" in opt and "method" in opt:  # 0.1's ODE stepper, and no scheduler saved
        opt, scheduler = _stepper_of_0_1(opt, state, schedule, step)
    elif isinstance(opt, dict) and "ode" in opt:  # 0.2's ODE stepper: the placement was penalty_at
        opt = {**opt, "ode": {"penalties": [], **migrate_options(opt["ode"])}}  # penalties: since 0.2.1
    return {
        "format": FORMAT,
        "run": run,
        "D": state["D"],
        "G": state["G"],
        "ema": state.get("ema"),
        "opt": opt,  # the Adam/SGD baselines' state (torch.optim's, with their step count) has not changed
        "scheduler": scheduler,
        "config": config,
    }


def _step(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"the checkpoint's step must be a count of steps, got {v!r}")
    return v


def _columns(means: dict) -> dict:
    """The interval sums of 0.2 with today's names (g_reg's value was 'penalty')."""
    if not means:
        return means
    rename = lambda d: {RENAMED_COLUMNS.get(k, k): v for k, v in d.items()}  # noqa: E731
    return {**means, "sums": rename(means.get("sums", {})), "seen": rename(means.get("seen", {}))}


BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _stepper_of_0_1(opt: dict, state: dict, schedule, step: int) -> tuple[dict, dict]:
    """0.1's stepper state {steps, h, reg, method, penalty, coupling} as torch.optim's (one param group per player,
    h scheduled as lr) and the LambdaLR state after ``step`` steps of the schedule 0.1 applied inside the stepper.
    The parameters are counted from the players' state dicts (every entry but BatchNorm's statistics)."""
    counts = [sum(1 for k in state[p] if not k.endswith(BN_BUFFERS)) for p in ("D", "G")]
    base = [float(h) for h in opt["h"]]
    if len(base) != 2:
        raise ValueError(f"the checkpoint's stepper state has {len(base)} step sizes, not one per player (D, G)")
    lr = [b * schedule(step) for b in base]
    groups, first = [], 0
    for name, n, b, h in zip("DG", counts, base, lr):
        groups.append({"lr": h, "player": name, "initial_lr": b, "params": list(range(first, first + n))})
        first += n
    ode = {
        "steps": int(opt["steps"]),
        "reg": float(opt["reg"]),
        "method": opt["method"],
        "reg_at": opt.get("penalty", "first_stage"),
        "coupling": opt.get("coupling", "joint"),
        "penalties": [],
    }
    sched = {"base_lrs": base, "last_epoch": step, "_step_count": step + 1, "_last_lr": lr, "lr_lambdas": [None]}
    return {"state": {}, "param_groups": groups, "ode": ode}, sched
