"""``odegan sweep``: a grid of settings over seeds, trained as populations (one method per population, at most
``members`` members each), a folder per member (config.json, metrics.jsonl, samples) and a summary at the top:
each setting's final metrics as mean, standard deviation and min-max over its seeds (summary.md, .json, .png).

Each population checkpoints itself (its parameters, optimiser, every member's random streams and records), so an
interrupted sweep resumes exactly; a finished population leaves done.json and is not run again.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
import time
from pathlib import Path

import torch

from .. import ops
from ..files import save_figure, write_file
from .checkpoint import atomic_save, read_checkpoint
from .config import make_config, resolve_device, written_options
from .population import MEMBER_OPTIONS, Population

POPULATIONS = "populations"
OWN_AXES = {"seed": "--seeds", "h": "--h", "reg": "--reg", "method": "--method", "out": "--out"}  # the sweep's own


def parse_seeds(text: str) -> list[int]:
    """``0-15``, ``0,3,5`` or a mix (``0-3,8``) as a list of distinct seeds in order."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            lo, sep, hi = part.partition("-")
            got = list(range(int(lo), int(hi) + 1)) if sep else [int(part)]
        except ValueError:
            raise ValueError(f"--seeds takes ranges and lists such as 0-15 or 0,3,5, got {text!r}") from None
        if sep and int(hi) < int(lo):
            raise ValueError(f"--seeds range {part!r} is empty (the end is below the start)")
        seeds += got
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds must be distinct seeds >= 0, got {text!r}")
    return seeds


def parse_values(text: str | None, name: str, kind=float) -> list | None:
    """A comma-separated list of values for one grid axis (None: the preset's own)."""
    if text is None:
        return None
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} takes a comma-separated list, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise ValueError(f"--{name} needs distinct values, got {text!r}")
    return values


_NOT_PLANNED = ("out", "device", "threads", "progress")  # where and how it runs, not what it trains
# options that say where and how a sweep runs, or that it never reads: not axes (two settings would train alike)
NOT_AXES = (*_NOT_PLANNED[1:], "workers", "ckpt_every", "ckpt_minutes", "plot_every", "tensorboard")
NAME_MAX = 255  # bytes in one file name (a setting's folder)


def _canon(value):
    """A value as settings are told apart: -0.0 is 0.0."""
    return value + 0.0 if isinstance(value, float) else value


def _num_text(value) -> str:
    """%g where it reads back as the same number, else the shortest repr that does (0.1234567 is not 0.123457)."""
    text = f"{_canon(value):g}"
    return text if float(text) == value else repr(_canon(value))


def _label(value) -> str:
    """A value as a setting name shows it: a number as _num_text, anything else with only ASCII [A-Za-z0-9.+-] kept."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _num_text(value)
    return "".join(c if (c.isascii() and c.isalnum()) or c in ".+-" else "-" for c in str(value))


def setting_name(method: str, h: float, reg: float, extra=()) -> str:
    """``euler_h0.1_reg0.07``, then ``_KEYvalue`` for each further axis (``extra``: (key, value) pairs)."""
    return f"{method}_h{_num_text(h)}_reg{_num_text(reg)}" + "".join(f"_{k}{_label(v)}" for k, v in extra)


def _checked_vary(vary, sets) -> dict:
    """--vary's axes {key: [values]}: any option but the sweep's own flags, --set's and NOT_AXES, each with distinct
    values."""
    if not isinstance(vary, dict):
        raise TypeError(f"vary must be a dict {{option: [values]}}, got {type(vary).__name__}")
    for key, values in vary.items():
        if key in OWN_AXES:
            raise ValueError(f"{key} has its own sweep flag ({OWN_AXES[key]}): not --vary")
        if key in NOT_AXES:
            raise ValueError(f"{key} says how the sweep runs, not what it trains: give it with --set, not --vary")
        if key in sets:
            flag = "--steps" if key == "steps" else "--set"
            raise ValueError(f"{key} is given both by {flag} and by --vary: give it once")
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
            raise TypeError(f"vary[{key!r}] must be a list of values, got {values!r}")
        if not values or len({json.dumps(_canon(v), sort_keys=True) for v in values}) != len(values):
            raise ValueError(f"--vary {key} needs distinct values, got {values!r}")
    return dict(vary)


def plan(
    preset: str, out, seeds, hs=None, regs=None, methods=None, sets=None, members: int = 16, vary=None
) -> list[list]:
    """The grid's product as populations: [[(setting, seed, Config), ...], ...], one method per population and at
    most ``members`` members each, every member's out folder OUT/<setting>/seed<s>. ``vary``: further axes {option:
    [values]}; a member option (MEMBER_OPTIONS: r1, r2, wgan_gp, consensus, h_g) shares populations as h and lambda
    do, any other option gets populations of its own, as a method does. Each member's Config is checked whole (a
    --set option checked against the axes it is given with)."""
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ValueError(f"--members must be an int >= 1, got {members!r}")
    sets = dict(sets or {})
    for key, flag in OWN_AXES.items():
        if key in sets:
            raise ValueError(f"{key} is a sweep axis or the sweep's own: give it as {flag}, not --set")
    vary = _checked_vary(vary or {}, sets)
    shared = [k for k in vary if k in MEMBER_OPTIONS]
    apart = [k for k in vary if k not in MEMBER_OPTIONS]
    base = make_config(preset)  # the preset's method, h and lambda, where no axis gives them
    out = Path(out)
    pops, names, seen = [], {}, set()
    for method in methods or [base.method]:
        for split in itertools.product(*(vary[k] for k in apart)):
            grid = []
            for h, reg, *within, seed in itertools.product(
                hs or [base.h], regs or [base.reg], *(vary[k] for k in shared), seeds
            ):
                extra = dict(zip(apart, split)) | dict(zip(shared, within))
                given = (("method", method, methods), ("h", h, hs), ("reg", reg, regs))
                axes = {k: v for k, v, asked in given if asked}
                cfg = make_config(preset, **sets, **extra, **axes, seed=seed, out=str(out))  # (the axes given only:
                # an Adam preset has no method or h to set)
                name = setting_name(method, h, reg, [(k, getattr(cfg, k)) for k in vary])
                if len(name.encode()) > NAME_MAX:
                    raise ValueError(
                        f"the setting {name[:60]!r}... names a folder of {len(name.encode())} bytes, more than a file "
                        f"name holds ({NAME_MAX}): give shorter values"
                    )
                key = (method, h, reg, *(json.dumps(_canon(getattr(cfg, k)), sort_keys=True) for k in vary))
                if names.setdefault(name, key) != key:
                    raise ValueError(f"two settings would share the folder {name!r}: give values that name apart")
                if (name, seed) in seen:
                    raise ValueError(f"--vary gives the setting {name!r} twice (values equal as the options take them)")
                seen.add((name, seed))
                cfg.out = str(out / name / f"seed{seed}")
                cfg.validate()
                grid.append((name, seed, cfg))
            pops += [grid[i : i + members] for i in range(0, len(grid), members)]
    return pops


def check_populations(pops: list[list], root) -> None:
    """Build every population not yet done once, and let it go, before anything trains or is written: whatever a
    population refuses (an engine or a backend that cannot run its options, missing data) is said before the first
    step of the first one, not after others have trained."""
    for i, members in enumerate(pops):
        if not (Path(root) / POPULATIONS / f"p{i}" / "done.json").exists():
            pop = Population([dataclasses.replace(cfg) for _, _, cfg in members])
            for op in ("stage", "sqnorm"):  # a backend is resolved at its first call: now, not after others trained
                ops.resolve(pop.cfgs[0].backend, pop.cfgs[0].device, op)
            for problem in pop.problems:
                problem.close()
            del pop


def _metrics_dicts(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


class PopulationRun:
    """One population of a sweep: trains it to every member's ``steps`` with its records and checkpoint."""

    def __init__(self, index: int, members: list, root: Path, ckpt_every: int = 200, axes=()) -> None:
        self.index, self.members, self.axes = index, members, tuple(axes)
        self.dir = root / POPULATIONS / f"p{index}"
        self.cfgs = [cfg for _, _, cfg in members]
        self.ckpt_every = ckpt_every

    @property
    def done(self) -> Path:
        return self.dir / "done.json"

    def run(self, say=print) -> list[dict]:
        if self.done.exists():
            return json.loads(self.done.read_text())
        self.dir.mkdir(parents=True, exist_ok=True)
        pop = Population(self.cfgs)
        cfg, k = self.cfgs[0], len(self.cfgs)
        dev, dt = torch.device(cfg.device), cfg.torch_dtype
        fixed_z = [
            torch.randn(
                (c.eval_samples, pop.problems[0].z_dim),
                generator=torch.Generator(device=dev).manual_seed(10_000 + c.seed),
                device=dev,
                dtype=dt,
            )
            for c in self.cfgs
        ]
        records: list[list[dict]] = [[] for _ in range(k)]
        pstep = 0
        ckpt = self.dir / "checkpoint.pt"
        if ckpt.exists():
            state = read_checkpoint(ckpt)  # weights_only: a planted file is refused, never run
            held = state["params"]
            if not torch.is_tensor(held) or held.shape != pop.flat.params.shape:
                got = tuple(held.shape) if torch.is_tensor(held) else type(held).__name__
                raise ValueError(
                    f"{ckpt} holds parameters of shape {got}, this population {tuple(pop.flat.params.shape)}: the data "
                    "(a class-conditional pair's number of classes) changed since it was written; remove it to start "
                    "the population again"
                )
            pop.flat.params.copy_(held)
            pop.opt.load_state_dict(state["opt"])
            for s, (d, z) in zip(pop.streams, state["streams"]):
                s.data.set_state(d)
                s.z.set_state(z)
            for key in ("member_steps", "failures", "frozen", "diverged"):
                setattr(pop, key, list(state[key]))
            for b, saved in zip(pop.flat.buffers(), state.get("buffers", [])):  # BN statistics (image pairs)
                b.copy_(saved)
            for problem, saved in zip(pop.problems, state.get("problems", [])):  # the digits' loader positions
                problem.load_state_dict(saved)
            if any(a.enabled for a in pop.averages) and "averages" not in state:
                raise ValueError(
                    f"{ckpt} holds no averages of G but the members have ema > 0: it was not written by this sweep; "
                    "remove it to start the population again"
                )
            for average, saved in zip(pop.averages, state.get("averages", [None] * k)):  # ema > 0: G's averages
                average.load_state_dict(saved)
            pop.set_step_sizes()
            records, pstep = state["records"], state["run"]["pstep"]
            say(f"population {self.index}: resumed at step {pstep}")
        for c in self.cfgs:
            Path(c.out).mkdir(parents=True, exist_ok=True)
            write_file(Path(c.out) / "config.json", json.dumps(written_options(c), indent=1) + "\n")
        start = time.monotonic()
        while not all(pop.frozen):
            before = list(pop.member_steps)
            pop.step()
            pstep += 1
            res = pop.opt.last_result
            for m, c in enumerate(self.cfgs):
                s = pop.member_steps[m]
                if s == before[m]:
                    continue
                if s % c.log_every == 0 and res is not None and res.loss_d is not None:
                    records[m].append({"step": s, "loss_d": float(res.loss_d[m]), "loss_g": float(res.loss_g[m])})
                if s % c.eval_every == 0 or s >= c.steps:
                    records[m].append({"step": s, **self._evaluate(pop, m, fixed_z[m])})
                if s >= c.steps:
                    pop.freeze(m)
            if pstep % self.ckpt_every == 0 and not all(pop.frozen):
                self._checkpoint(ckpt, pop, records, pstep)
                done = sum(f and not d for f, d in zip(pop.frozen, pop.diverged))
                say(
                    f"population {self.index} ({cfg.method}, {k} members): step {pstep}, members done {done}, "
                    f"diverged {sum(pop.diverged)}"
                )
        results = []
        for m, (name, seed, c) in enumerate(self.members):
            write_file(Path(c.out) / "metrics.jsonl", _metrics_dicts(records[m]))
            problem, average = pop.problems[m], pop.averages[m]
            params = {"D": problem.D.state_dict(), "G": problem.G.state_dict()}
            if average.enabled:  # ema > 0: G with its weight average (BN statistics the trained ones), as sampled
                with average.swapped_in():
                    params["G_ema"] = {k: v.clone() for k, v in problem.G.state_dict().items()}
            atomic_save(params, Path(c.out) / "params.pt")
            if not pop.diverged[m]:
                samples = _samples(pop, m, fixed_z[m])
                pop.problems[m].plot(samples, Path(c.out) / f"samples_{c.steps}.png", f"{name} seed {seed}")
            final = [r for r in records[m] if "loss_d" not in r]
            results.append(
                {
                    "setting": name,
                    "seed": seed,
                    "method": c.method,
                    "h": c.h,
                    "reg": c.reg,
                    **({"options": {a: getattr(c, a) for a in self.axes}} if self.axes else {}),
                    "steps": pop.member_steps[m],
                    "diverged": pop.diverged[m],
                    "retries": pop.failures[m],
                    "final": final[-1] if final and not pop.diverged[m] else None,
                }
            )
        write_file(self.done, json.dumps(results, indent=1) + "\n")
        ckpt.unlink(missing_ok=True)
        say(
            f"population {self.index} ({cfg.method}, {k} members) finished in {time.monotonic() - start:.1f} s: "
            f"diverged {sum(pop.diverged)}"
        )
        return results

    @staticmethod
    def _evaluate(pop, m: int, z: torch.Tensor) -> dict:
        with pop.averages[m].swapped_in():  # FID draws from G itself: the average there too (Trainer.evaluate)
            metrics = pop.problems[m].evaluate(_samples(pop, m, z))
        return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}

    @staticmethod
    def _checkpoint(path: Path, pop, records, pstep: int) -> None:
        atomic_save(
            {
                "params": pop.flat.params.clone(),
                "opt": pop.opt.state_dict(),
                "streams": [(s.data.get_state(), s.z.get_state()) for s in pop.streams],
                "member_steps": pop.member_steps,
                "failures": pop.failures,
                "frozen": pop.frozen,
                "diverged": pop.diverged,
                "buffers": [b.clone() for b in pop.flat.buffers()],
                "problems": [p.state_dict() for p in pop.problems],
                "averages": [a.state_dict() for a in pop.averages],
                "records": records,
                "run": {"pstep": pstep},
            },
            path,
        )


@torch.no_grad()
def _samples(pop, m: int, z: torch.Tensor) -> torch.Tensor:
    """Member m's samples from its fixed latents as a solo run draws them (Trainer.samples): G in eval mode (BN
    running statistics), with its weight average when ema is on, 1024 latents at a time, a class-conditional G
    every class in turn; G's mode and trained parameters are restored after."""
    G, k = pop.problems[m].G, pop.problems[m].num_classes
    with pop.averages[m].evaluating(G):
        if not k:
            return torch.cat([G(part) for part in z.split(1024)])
        y = torch.arange(z.shape[0], device=z.device) % k
        return torch.cat([G(part, c) for part, c in zip(z.split(1024), y.split(1024))])


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def summarise(results: list[dict]) -> list[dict]:
    """Per setting: every final metric as mean, std (over seeds; 0 for one), min and max, and the diverged count."""
    rows = []
    by_setting: dict[str, list[dict]] = {}
    for r in results:
        by_setting.setdefault(r["setting"], []).append(r)
    for name, rs in by_setting.items():
        ok = [r["final"] for r in rs if r["final"] is not None]
        row = {"setting": name, "method": rs[0]["method"], "h": rs[0]["h"], "reg": rs[0]["reg"]}
        row.update({"options": rs[0]["options"]} if "options" in rs[0] else {})
        row.update({"seeds": len(rs), "diverged": sum(r["diverged"] for r in rs)})
        keys = list(dict.fromkeys(k for f in ok for k, v in f.items() if k != "step" and _number(v)))
        for key in keys:
            vals = [float(f[key]) for f in ok if _number(f.get(key)) and math.isfinite(f[key])]
            row[key] = {  # over the seeds with a finite value; "missing": those without one (None, NaN)
                "mean": statistics.fmean(vals) if vals else None,
                "std": (statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else None,
                "min": min(vals) if vals else None,
                "max": max(vals) if vals else None,
                **({"missing": len(ok) - len(vals)} if len(vals) < len(ok) else {}),
            }
        rows.append(row)
    return rows


def write_summary(root: Path, rows: list[dict], results: list[dict], seconds: float) -> None:
    root = Path(root)
    write_file(root / "summary.json", json.dumps({"settings": rows, "members": results, "seconds": seconds}, indent=1))
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, dict) and k != "options"})
    head = "| setting | seeds | diverged | " + " | ".join(f"{k} mean ± std [min, max]" for k in keys) + " |"
    lines = [f"# Sweep summary ({seconds:.0f} s)", "", head, "|" + " --- |" * (3 + len(keys))]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            if v is None or v["mean"] is None:
                cells.append("-")
                continue
            cell = f"{v['mean']:.3g} ± {v['std']:.3g} [{v['min']:.3g}, {v['max']:.3g}]"
            cells.append(cell + (f" ({v['missing']} seed(s) without a finite value)" if v.get("missing") else ""))
        lines.append(f"| {r['setting']} | {r['seeds']} | {r['diverged']} | " + " | ".join(cells) + " |")
    write_file(root / "summary.md", "\n".join(lines) + "\n")
    _plot(root / "summary.png", rows)


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "modes" if any("modes" in r for r in rows) else None
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(rows) + 2), 3.5))
    for i, r in enumerate(rows):
        v = r.get(metric) if metric else None
        if v is None or v["mean"] is None:
            continue
        ax.errorbar([i], [v["mean"]], yerr=[[v["mean"] - v["min"]], [v["max"] - v["mean"]]], fmt="o", capsize=3)
        ax.errorbar([i], [v["mean"]], yerr=[v["std"]], fmt="none", lw=4, alpha=0.4)
    ax.set_xticks(range(len(rows)), [r["setting"] for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(f"{metric or 'metric'}: mean, std (thick), min-max")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


PLAN = "plan.json"


def _plan(pops: list[list]) -> list[list]:
    """What a sweep trains: per population, each member's setting, seed and options (as config.json has them)."""
    return [
        [[name, seed, {k: v for k, v in written_options(c).items() if k not in _NOT_PLANNED}] for name, seed, c in m]
        for m in pops
    ]


def check_plan(root: Path, pops: list[list], write: bool = True) -> None:
    """A sweep folder holds one sweep: the same command resumes it (done populations are read back, an interrupted
    one resumes); another grid, other seeds, steps or options are refused in one line, never answered with the old
    results. A new folder gets the plan written (``write``: rank 0's)."""
    path, plan = root / PLAN, json.loads(json.dumps(_plan(pops)))  # (as JSON reads it back: tuples are lists)
    if not path.exists():
        if any((root / POPULATIONS).glob("p*/done.json")):
            raise ValueError(
                f"{root} holds finished populations but no {PLAN} (an earlier version's sweep): pass --out for a new "
                "sweep, or remove it"
            )
        if write:
            write_file(path, json.dumps(plan, indent=1) + "\n")
        return
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read as a sweep plan ({exc}): pass --out for a new sweep") from None
    if held == plan:
        return
    was = {(n, s): o for p in held if isinstance(p, list) for n, s, o in p} if isinstance(held, list) else {}
    now = {(n, s): o for p in plan for n, s, o in p}
    if set(was) != set(now):
        there, here = (
            sorted({n for n, _ in was} - {n for n, _ in now}),
            sorted({n for n, _ in now} - {n for n, _ in was}),
        )
        diff = f"members {_members(was)} there, {_members(now)} now"
        if there or here:
            show = lambda names: ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")  # noqa: E731
            diff += "; " + "; ".join(
                part
                for part in (there and f"settings only there: {show(there)}", here and f"only now: {show(here)}")
                if part
            )
    else:
        key, name = next(((k, n) for k in now for n in now[k] if now[k].get(n) != was[k].get(n)), (None, None))
        diff = f"{name} {was[key].get(name)!r} there, {now[key].get(name)!r} now" if key else "the populations differ"
    raise ValueError(
        f"{root} holds another sweep ({diff}): rerun its own command to resume it, or pass --out for a new sweep"
    )


def _members(members: dict) -> str:
    settings = sorted({n for n, _ in members})
    seeds = sorted({s for _, s in members})
    return f"{len(settings)} setting(s) x seeds {seeds}" if len(seeds) <= 8 else f"{len(members)} members"


def run_sweep(pops: list[list], out, ckpt_every: int = 200, say=print, axes=()) -> list[dict]:
    """Train every population not yet done (resuming one that was interrupted), then write the summary. Every
    population is built once first (check_populations), and the plan written only then. ``axes``: the options
    each member's results name under "options" (the CLI passes --vary's). Under torchrun (WORLD_SIZE > 1) the
    populations are shared out across the ranks (population i on rank i mod world, on that rank's device); rank 0
    writes the summary once every rank has finished its share."""
    from ..distributed import init_distributed

    root = Path(out)
    axes = list(axes)
    rank, world, device = init_distributed(resolve_device(pops[0][0][2].device) if pops else "cpu")  # as a Trainer
    if root.exists():
        check_plan(root, pops, write=False)  # another sweep's folder: said before anything is built
    check_populations(pops, root)
    root.mkdir(parents=True, exist_ok=True)
    check_plan(root, pops, write=rank == 0)
    if world > 1:
        torch.distributed.barrier()  # the plan is on disk before a rank starts
    start = time.monotonic()
    for i, members in enumerate(pops):
        if i % world != rank:
            continue
        for _, _, cfg in members:
            cfg.device = device
        run = PopulationRun(i, members, root, ckpt_every, axes)
        run.run(say)
        if world > 1:
            write_file(run.dir / f"trained_by_rank{rank}", "")
    if world > 1:
        torch.distributed.barrier()
    results = [r for i, members in enumerate(pops) for r in PopulationRun(i, members, root, axes=axes).run(say)]
    rows = summarise(results)
    if rank == 0:
        write_summary(root, rows, results, time.monotonic() - start)
    if world > 1:
        torch.distributed.barrier()  # the summary is on disk before any rank returns
    return rows
