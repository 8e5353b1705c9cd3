"""The main job's whole process against a JAX run of the same training, A/B (issue 21's goal: ``odegan train mog``
at or below the JAX colab run's time, cold and warm cache).

    python -m bench.main_job_ab --steps 10000 --pairs 3                  # eager main job against JAX
    python -m bench.main_job_ab --steps 10000 --pairs 3 --compile warm   # ... and compile=true, warm cache

Each pair runs ``odegan train mog --steps S`` and ``python -m bench.jax_mog --steps S`` (bench/jax_mog.py: the same
problem, step and settings written in JAX, batches drawn inside JAX) as separate processes, back to back, the
order alternating between pairs so a changing load hits both sides alike. Periodic evaluation and plots are off
on both sides (``--set eval_every=, plot_every=`` past S; TensorBoard off, no progress bar); both end as the main
job's last step does, with one evaluation of 5120 samples from fixed latents and one samples picture: that cost
is included on both sides (the main job also evaluates at step 0 and writes its checkpoints, which it always
does). ``--compile warm`` adds the main job with ``--set compile=true`` to every pair, reading an Inductor cache
that one cold run (an empty ``TORCHINDUCTOR_CACHE_DIR``, timed and reported as such) filled first;
``--compile cold`` runs that cold one only. Wall seconds and CPU seconds (user + system, the child's own and
its children's) per process; median, range and ratios to the JAX run's median. Writes a CSV (a row per process)
and a markdown summary under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import RESULTS, append_csv

OFF = 10**9  # an interval past any run: the option's periodic work never falls due before the last step


def main_job_cmd(steps: int, out: Path, compile: bool = False) -> list[str]:
    sets = [f"eval_every={OFF}", f"plot_every={OFF}", "tensorboard=false"] + (["compile=true"] if compile else [])
    cmd = [sys.executable, "-m", "odegan_kernels", "train", "mog", "--steps", str(steps), "--out", str(out)]
    return cmd + ["--no-progress", *(a for s in sets for a in ("--set", s))]


def jax_cmd(steps: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "bench.jax_mog", "--steps", str(steps), "--plot", str(out / "samples.png")]


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd to the end: wall seconds, CPU seconds (user + system of the process and what it waited for), rc,
    and the last line of its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return {"wall_s": wall, "cpu_s": cpu, "rc": proc.returncode, "last": lines[-1][:300] if lines else ""}


def outcome(side: str, run_dir: Path, last: str) -> dict:
    """Modes, high-quality fraction and training steps per second at the end, from the run's summary.json or the
    JAX run's JSON line (empty where the run wrote neither)."""
    try:
        if side == "jax":
            got = json.loads(last)
            got["steps_per_s"] = got["steps"] / got["train_s"]
        else:
            got = json.loads((run_dir / "summary.json").read_text())
        return {k: got[k] for k in ("modes", "high_quality", "steps_per_s")}
    except (ValueError, KeyError, OSError, ZeroDivisionError):
        return {}


def summarise(rows: list[dict]) -> list[str]:
    by = {}
    for r in rows:
        if r["rc"] == 0:
            by.setdefault(r["side"], []).append(r)
    jax_wall = statistics.median(r["wall_s"] for r in by["jax"]) if "jax" in by else None
    jax_cpu = statistics.median(r["cpu_s"] for r in by["jax"]) if "jax" in by else None
    md = [
        "| process | runs | wall s median | wall range | CPU s median | CPU range | wall / JAX | CPU / JAX |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for side, rs in by.items():
        w, c = [r["wall_s"] for r in rs], [r["cpu_s"] for r in rs]
        rw = f"{statistics.median(w) / jax_wall:.2f}" if jax_wall else ""
        rc = f"{statistics.median(c) / jax_cpu:.2f}" if jax_cpu else ""
        md.append(
            f"| {side} | {len(rs)} | {statistics.median(w):.1f} | {min(w):.1f}-{max(w):.1f} "
            f"| {statistics.median(c):.1f} | {min(c):.1f}-{max(c):.1f} | {rw} | {rc} |"
        )
    pairs = {}
    for r in rows:
        pairs.setdefault(r["pair"], {})[r["side"]] = r
    ratios = [p["eager"]["wall_s"] / p["jax"]["wall_s"] for p in pairs.values() if {"eager", "jax"} <= p.keys()]
    if ratios:
        md.append(f"\nEager / JAX wall, pair by pair: {', '.join(f'{x:.2f}' for x in ratios)}")
    failed = [f"{r['side']} (pair {r['pair']}): rc {r['rc']}: {r['last']}" for r in rows if r["rc"] != 0]
    return md + ([""] + [f"- failed: {f}" for f in failed] if failed else [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--compile", choices=("off", "cold", "warm"), default="off")
    ap.add_argument("--out", default=None, help="CSV path (default bench/results/main_job_ab_cpu.csv)")
    args = ap.parse_args(argv)
    if args.steps < 100 or args.steps % 100 or args.pairs < 1:
        ap.error(f"--steps must be a positive multiple of 100 and --pairs at least 1, got {args.steps}, {args.pairs}")
    out = Path(args.out) if args.out else RESULTS / "main_job_ab_cpu.csv"
    rows: list[dict] = []
    base = {"steps": args.steps, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="main_job_ab_") as tmp:
        tmp = Path(tmp)
        cache = tmp / "inductor"

        def one(pair: int, side: str) -> None:
            run_dir = tmp / f"{side}_{pair}"
            run_dir.mkdir()
            env = None
            if side.startswith("compile"):
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
                cmd = main_job_cmd(args.steps, run_dir, compile=True)
            else:
                cmd = jax_cmd(args.steps, run_dir) if side == "jax" else main_job_cmd(args.steps, run_dir)
            got = timed(cmd, env)
            row = {**base, "pair": pair, "side": side, **got, "modes": "", "high_quality": "", "steps_per_s": ""}
            row.update(outcome(side, run_dir, got["last"]))
            rows.append(row)
            append_csv(out, [row])
            print(
                f"pair {pair} {side:13s} wall {got['wall_s']:7.1f} s  CPU {got['cpu_s']:7.1f} s  rc {got['rc']}",
                flush=True,
            )

        if args.compile != "off":  # the cold compile first: it fills the cache the warm runs read
            one(0, "compile_cold")
        for pair in range(1, args.pairs + 1):
            sides = ["eager", "jax"] + (["compile_warm"] if args.compile == "warm" else [])
            for side in sides if pair % 2 else sides[::-1]:
                one(pair, side)
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    md = [
        f"# The main job against JAX, whole processes ({args.steps} steps, {args.pairs} pairs)\n",
        f"Command: `python -m bench.main_job_ab {shown}`; {base['date']}\n",
        *summarise(rows),
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out}, {out.with_suffix('.md')}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
