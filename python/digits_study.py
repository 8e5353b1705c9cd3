"""The paper's image claims at small scale, on scikit-learn's digits with the offline classifier metric.

    python python/digits_study.py --seconds 100 --seeds 0 1 2 --out runs/digits_study      # the whole grid
    python python/digits_study.py --groups methods --seconds 100 --seeds 0 1 2             # one group
    python python/digits_study.py --table runs/digits_study                                # the table again

Every run is the digits preset (``odegan train digits``) with one setting changed, trained for the same wall time
(``--seconds`` of training steps, timed from the first step; the step-0 evaluation and the classifier's training
come before it), one run after another, each in its own process on one CPU thread. The clock is the process's
own CPU time (``--clock cpu``, the default), so other work on the machine slows a run down without shortening
it: on an idle machine, one thread, it is the wall time (``--clock wall`` times the wall instead). Then it is
stopped at a step boundary (SIGTERM, as the trainer handles it) and evaluated there (fid_classifier, coverage, score:
the classifier metric of classifier.py, 1000 samples against the 364 held-out digits). A divergence (non-finite
losses or parameters) ends the run (recover_retries 0), and the row says at which step. Groups:

  methods  RK4 with the regulariser (the preset: h 0.04, lambda 0.02) against Euler (same h and lambda) and
           Adam (lr 2e-4, betas 0.5/0.999, no regulariser), at equal wall time
  reg      RK4 with lambda 0 against the preset's 0.02
  h        RK4 and Euler at h 0.02, 0.04, 0.08, 0.16 (lambda 0.02): where each becomes unstable

A setting's runs are made once whichever group asks (rk4-h0.04 serves all three).

Writes OUT/runs.jsonl (one row per run, appended as each finishes, so an interrupted study keeps what it
measured) and OUT/table.md (mean and range over seeds per setting).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

GROUPS = {
    "methods": {
        "rk4-h0.04": {},
        "euler-h0.04": {"method": "euler"},
        "adam": {"optimizer": "adam", "lr": 2e-4, "reg": 0.0},
    },
    "reg": {"rk4-h0.04-reg0": {"reg": 0.0}, "rk4-h0.04": {}},
    "h": {
        f"{m}-h{h}": ({"method": m, "h": h} if m == "euler" else {"h": h})
        for m in ("rk4", "euler")
        for h in (0.02, 0.04, 0.08, 0.16)
    },
}


def run_one(name: str, opts: dict, seed: int, seconds: float, out: Path, clock_name: str = "cpu") -> dict:
    """One run in this process: the digits preset with ``opts``, trained for ``seconds``, then evaluated."""
    from odegan_kernels.train import NonFiniteError, Trainer, TrainingInterrupted, make_config

    base = dict(seed=seed, out=str(out), progress=False, tensorboard=False, recover_retries=0)
    base.update(steps=10**7, eval_every=10**7, plot_every=10**7, ckpt_every=10**7, ckpt_minutes=10**4)
    shared = out.parent / "classifier"  # the metric's classifier is the same for every run: train it once
    out.mkdir(parents=True, exist_ok=True)
    for f in shared.glob("classifier-*.pt"):
        shutil.copy(f, out / f.name)
    tr = Trainer(make_config("digits", **base, **opts))
    inner, started = tr.closure, []

    clock = time.process_time if clock_name == "cpu" else time.perf_counter

    def timed(stage):  # the clock starts at the first step, after the step-0 evaluation
        now = clock()
        if not started:
            started.append(now)
            started.append(time.perf_counter())
        elif now - started[0] >= seconds and len(started) == 2:
            started.append(now)  # once: the trainer stops at the end of this step and checkpoints
            os.kill(os.getpid(), signal.SIGTERM)
        return inner(stage)

    tr.closure = timed
    row = {"setting": name, "seed": seed, **opts, "seconds": seconds, "clock": clock_name}
    try:
        tr.run()
        row["stopped"] = "finished"
    except TrainingInterrupted:
        row["stopped"] = "time"
    except NonFiniteError as exc:
        row["stopped"] = "diverged"
        row["error"] = str(exc).splitlines()[0]
    row["train_s"] = round(clock() - started[0], 1)  # on the run's clock
    row["train_wall_s"] = round(time.perf_counter() - started[1], 1)
    row["step"] = tr.step
    row["steps_per_s"] = round(tr.step / row["train_s"], 2)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    row["param_growth"] = sum(r.get("event") == "param_growth" for r in rows)
    if not shared.exists():
        shared.mkdir()
        for f in out.glob("classifier-*.pt"):
            shutil.copy(f, shared / f.name)
    if row["stopped"] == "diverged":
        return row
    # evaluate where it stopped: a rerun to the step it reached resumes there and does the final evaluation
    final = Trainer(make_config("digits", **{**base, "steps": tr.step}, **opts))
    summary = final.run()
    final.problem.plot(final.samples(), out / f"samples_{tr.step:07d}.png", f"{name} seed {seed} step {tr.step}")
    row.update({k: summary.get(k) for k in ("fid_classifier", "coverage", "score")})
    return row


def table(rows: list[dict]) -> str:
    """Mean and range over seeds of each setting's final metrics, in the order the settings first ran."""
    order = list(dict.fromkeys(r["setting"] for r in rows))
    out = [
        "| setting | seeds | steps reached | train s | fid_classifier mean [min, max] | coverage | score | diverged |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def span(vals, fmt):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        return f"{fmt.format(statistics.mean(vals))} [{fmt.format(min(vals))}, {fmt.format(max(vals))}]"

    for s in order:
        rs = [r for r in rows if r["setting"] == s]
        div = [r for r in rs if r["stopped"] == "diverged"]
        ok = [r for r in rs if r["stopped"] != "diverged"]
        steps = f"{min(r['step'] for r in rs)}-{max(r['step'] for r in rs)}"
        divs = f"{len(div)}/{len(rs)}" + (f" (steps {', '.join(str(r['step']) for r in div)})" if div else "")
        out.append(
            f"| {s} | {','.join(str(r['seed']) for r in rs)} | {steps} | {span([r['train_s'] for r in rs], '{:.0f}')} "
            f"| {span([r['fid_classifier'] for r in ok], '{:.0f}')} | {span([r['coverage'] for r in ok], '{:.2f}')} "
            f"| {span([r['score'] for r in ok], '{:.2f}')} | {divs} |"
        )
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--seconds", type=float, default=100.0, help="time of training steps per run, on --clock")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="the process's CPU time, or the wall")
    p.add_argument("--out", default="runs/digits_study")
    p.add_argument("--table", metavar="OUT", help="only write OUT/table.md from OUT/runs.jsonl")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run, as JSON, in this process
    args = p.parse_args(argv)
    if args.one:
        spec = json.loads(args.one)
        row = run_one(spec["name"], spec["opts"], spec["seed"], spec["seconds"], Path(spec["out"]), spec["clock"])
        print(json.dumps(row))
        return 0
    out = Path(args.table or args.out)
    log = out / "runs.jsonl"
    if not args.table:
        out.mkdir(parents=True, exist_ok=True)
        old = map(json.loads, log.read_text().splitlines()) if log.exists() else []
        done = {(r["setting"], r["seed"]) for r in old}
        for group in args.groups:
            for name, opts in GROUPS[group].items():
                for seed in args.seeds:
                    if (name, seed) in done:  # one run per setting and seed, whichever group asked first
                        continue
                    done.add((name, seed))
                    spec = dict(name=name, opts=opts, seed=seed, seconds=args.seconds, clock=args.clock)
                    spec["out"] = str(out / f"{name}-s{seed}")
                    if Path(spec["out"]).exists():  # a run the study was stopped in: start it again, not resume it
                        shutil.rmtree(spec["out"])
                    t0 = time.perf_counter()
                    res = subprocess.run(
                        [sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True
                    )
                    if res.returncode != 0:
                        print(res.stderr[-2000:], file=sys.stderr)
                        return res.returncode
                    row = json.loads(res.stdout.strip().splitlines()[-1])
                    row["wall_s"] = round(time.perf_counter() - t0, 1)
                    with open(log, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    (out / "table.md").write_text(table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
