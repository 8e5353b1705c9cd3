"""A population of K toy runs, ours against JAX's vmap of the same step, paired: round-robin in one process, so a
shared machine's load hits both alike (bench/population.py times its rows one after another). Issue 20's goal.

    python -m bench.population_ab --members 16 --rounds 6
    python -m bench.population_ab --members 16 --counts      # ... and what each step is made of
    python -m bench.population_ab --members 16 --compiled    # ... and the population with compile=true

Rows: ``pop_mlp`` (Population of the mog preset, hand-derived engine, one CPU thread), with ``--compiled`` also
``pop_mlp_compiled`` (the same population with compile=true: its whole step traced), ``jax_vmap`` (one jitted call
a step) and ``jax_vmap_scan`` (lax.scan of 10 steps a call) from bench/jax_step.py's ``setup_population``, each
member drawing its own batch every step on both sides. ``--counts``: our step's aten calls and matrix products
(torch.profiler, 10 steps) and the compiled XLA step's operations (its HLO's entry computation). Writes
bench/results/population_ab_<device>.md.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from . import jax_step
from .common import RESULTS, bench

MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_")


def our_counts(pop, steps: int = 10) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            pop.step()
    ev = prof.key_averages()
    calls = sum(e.count for e in ev if e.key.startswith("aten::")) / steps
    mm = [e for e in ev if e.key in MATMULS]
    top = sorted((e for e in ev if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)[:6]
    parts = ", ".join(
        f"{e.key[6:]} {e.count / steps:.0f} calls {e.self_cpu_time_total / steps / 1e3:.1f} ms" for e in top
    )
    return (
        f"ours: {calls:.0f} aten calls a step (every level), {sum(e.count for e in mm) / steps:.0f} of them matrix "
        f"products ({sum(e.self_cpu_time_total for e in mm) / steps / 1e3:.1f} ms self CPU a step under the profiler); "
        f"most self time: {parts}"
    )


def xla_counts(k: int, device: str) -> str:
    from odegan_kernels.models import mog_pair

    jax = jax_step.import_jax(device)
    _, _, state = jax_step.setup_population([mog_pair(seed=s) for s in range(k)], 0.1, 0.07, device=device)
    step, draw = jax.vmap(jax_step.colab_step_fn(device)), jax.vmap(lambda key: jax_step.mog_draw(key, 512, device))
    h = jax.numpy.full(k, 0.1)

    def advance(p, key):
        real, z = draw(jax.random.split(key, k))
        return step(p, real, z, h, 0.7 * h)

    text = jax.jit(advance).lower(state["params"], state["key"]).compile().as_text()
    entry = text[text.index("ENTRY") :].split("\n}")[0]
    ops: dict[str, int] = {}
    for m in re.finditer(r"= \S+ ([a-z][\w-]*)\(", entry):
        ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    shown = ", ".join(f"{n} {c}" for n, c in sorted(ops.items(), key=lambda x: -x[1])[:4])
    dots: dict[str, int] = {}  # every dot, the entry's and those XLA fused into other computations
    for m in re.finditer(r"= (\S+?)\{[^}]*\} dot\(", text):
        dots[m.group(1)] = dots.get(m.group(1), 0) + 1
    by_shape = ", ".join(f"{c} x {s}" for s, c in sorted(dots.items(), key=lambda x: -x[1]))
    return (
        f"JAX: the compiled step's entry computation has {sum(ops.values())} operations ({shown}); in all its "
        f"computations (fusions included) {sum(dots.values())} dots ({by_shape})"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--rep-ms", type=float, default=700, help="timing per row and round")
    ap.add_argument("--counts", action="store_true", help="also count what each step is made of")
    ap.add_argument("--compiled", action="store_true", help="also the population with compile=true (a traced step)")
    ap.add_argument("--device", default="cpu", choices=("cpu",), help="the CPU only, for now")
    args = ap.parse_args(argv)
    if args.members < 1 or args.rounds < 1 or not args.rep_ms > 0:
        ap.error("--members and --rounds must be at least 1 and --rep-ms positive")
    if not jax_step.available():
        ap.error("the JAX side needs jax: pip install 'jax[cpu]'")
    from odegan_kernels.models import mog_pair
    from odegan_kernels.train.config import make_config
    from odegan_kernels.train.population import Population

    torch.set_num_threads(1)
    k = args.members
    cfgs = lambda **kw: [make_config("mog", method="rk4", grads="mlp", device="cpu", seed=s, **kw) for s in range(k)]  # noqa: E731
    pop = Population(cfgs())
    traced = Population(cfgs(compile=True)) if args.compiled else None
    once, many, state = jax_step.setup_population([mog_pair(seed=s) for s in range(k)], 0.1, 0.07, scan_steps=10)
    once(), many()  # compiled outside the timing
    rows = {"pop_mlp": (pop.step, 1), "jax_vmap": (once, 1), "jax_vmap_scan": (many, 10)}
    if traced is not None:
        t0 = time.perf_counter()
        traced.step(), traced.step()  # the first step traces and compiles (prepare_trace at build), outside the timing
        compile_s = time.perf_counter() - t0
        rows = {"pop_mlp": rows["pop_mlp"], "pop_mlp_compiled": (traced.step, 1), **rows}
    rates: dict[str, list[float]] = {v: [] for v in rows}
    host = torch.device("cpu")
    for _ in range(args.rounds):
        for variant, (fn, per) in rows.items():
            rates[variant].append(k * per * 1e3 / bench(fn, host, warmup_ms=50, rep_ms=args.rep_ms)[0])
    ours = [p for p in (pop, traced) if p is not None]
    ok = jax_step.finite(state) and all(bool(torch.isfinite(p.flat.params).all()) for p in ours)
    md = [
        f"# K = {k} members, ours against JAX's vmap, round-robin ({args.rounds} rounds)\n",
        f"Command: `python -m bench.population_ab {' '.join(argv if argv is not None else sys.argv[1:])}`\n",
        "| variant | member-steps/s median | per round |",
        "| --- | --- | --- |",
    ]
    md += [f"| {v} | {statistics.median(r):.1f} | {', '.join(f'{x:.0f}' for x in r)} |" for v, r in rates.items()]
    for mine in ("pop_mlp", "pop_mlp_compiled")[: len(ours)]:
        for other in ("jax_vmap", "jax_vmap_scan"):
            per = [a / b for a, b in zip(rates[mine], rates[other])]
            md.append(f"\n{mine} / {other}, round by round: {', '.join(f'{x:.2f}' for x in per)} (>= 1: ours as fast)")
    if traced is not None:
        per = [a / b for a, b in zip(rates["pop_mlp_compiled"], rates["pop_mlp"])]
        md.append(f"\npop_mlp_compiled / pop_mlp, round by round: {', '.join(f'{x:.2f}' for x in per)}")
        md.append(f"\npop_mlp_compiled: its first two steps (the first traces and compiles) took {compile_s:.1f} s")
    if not ok:
        md.append("\nDIVERGED: a timing of non-finite arithmetic")
    if args.counts:
        md += ["", "- " + our_counts(pop), "- " + xla_counts(k, "cpu")]
    out = RESULTS / f"population_ab_{args.device}.md"
    out.write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {Path('bench/results') / out.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
