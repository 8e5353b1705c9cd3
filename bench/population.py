"""Populations: member-steps per second of K members trained as one batched run, against K solo runs.

    python -m bench.step --members 1,4,16,64           # CPU: the toy pair (the mog preset's RK4 step)
    python -m bench.step --members 1,4,16,64 --device cuda

Rows (one per K and engine): ``pop_mlp`` (the hand-derived engine, batched), ``pop_autograd`` (vmap of
functional_call), against ``solo_mlp`` / ``solo_autograd`` (one run's steps per second: K solo runs cost K times a
step). The population's gain is ``pop / solo`` member-steps per second. Not here yet: the DCGAN (its G has
BatchNorm buffers, which populations do not take yet) and JAX's vmap of the same step (bench/jax_step.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from odegan_kernels.flat import FlatParams
from odegan_kernels.problems import build_problem
from odegan_kernels.train.baselines import build_optimizer
from odegan_kernels.train.closure import GameClosure
from odegan_kernels.train.config import make_config
from odegan_kernels.train.population import Population
from odegan_kernels.train.state import RandomStreams

from .common import RESULTS, append_csv, bench, environment, markdown_table, sync


def _solo_step(cfg):
    problem = build_problem(cfg.problem, cfg)
    flat = FlatParams(D=problem.D, G=problem.G, dtype=cfg.torch_dtype)
    opt, _ = build_optimizer(cfg, flat)
    streams = RandomStreams(cfg.seed, 0, cfg.device)
    closure = GameClosure(cfg, problem, streams.data, streams.z)
    return lambda: opt.step(closure)


def run(
    members: list[int], device: torch.device, out: Path | None, rep_ms: float, table: bool = True, jax: bool = True
) -> int:
    if device.type == "cpu":
        torch.set_num_threads(1)  # the toy's tiny matrices run fastest on one thread
    env = environment(device)
    out = out or RESULTS / f"population_{device.type}.csv"
    rows = []
    for grads in ("mlp", "autograd"):
        cfg = make_config("mog", method="rk4", grads=grads, device=str(device), threads=1)
        cfg.validate()
        med, _, _ = bench(_solo_step(cfg), device, rep_ms=rep_ms)
        solo = 1e3 / med
        rows.append({"variant": f"solo_{grads}", "members": 1, "member_steps_s": solo, "vs_solo": 1.0, **env})
        for k in members:
            cfgs = [make_config("mog", method="rk4", grads=grads, device=str(device), seed=s) for s in range(k)]
            pop = Population(cfgs)
            med, _, _ = bench(pop.step, device, rep_ms=rep_ms)
            rate = k * 1e3 / med
            rows.append(
                {"variant": f"pop_{grads}", "members": k, "member_steps_s": rate, "vs_solo": rate / solo, **env}
            )
            append_csv(out, rows[-1:])
            print(f"{grads:8s} K={k:3d}: {rate:8.1f} member-steps/s ({rate / solo:.2f}x solo's {solo:.1f})")
            sync(device)
    if jax:  # JAX's vmap of the same step (--no-jax-vmap: not)
        rows += jax_rows(members, device, rep_ms, env, out)
    if table:  # (--no-plot: the CSV alone, as the GPU check keeps its files few)
        out.with_suffix(".md").write_text(markdown_table(rows, ["variant", "members", "member_steps_s", "vs_solo"]))
    print(f"wrote {out}" + (f", {out.with_suffix('.md')}" if table else ""))
    return 0


def jax_rows(members: list[int], device: torch.device, rep_ms: float, env: dict, out: Path) -> list[dict]:
    """JAX's vmap of the same step (bench/jax_step.py's colab step, each member its own parameters from its seed's
    start and its own batch drawn inside JAX per step): ``jax_vmap`` (one jitted call a step) and ``jax_vmap_scan``
    (lax.scan of 10 steps a call), member-steps/s at each K, against ``jax_solo`` (K = 1: a vmap of one member);
    host-timed. None where jax does not import."""
    from . import jax_step

    if not jax_step.available():
        print("jax rows skipped: jax is not installed here")
        return []
    from odegan_kernels.models import mog_pair

    host = torch.device("cpu")

    def timed(k: int) -> tuple[float, float, bool]:
        """(member-steps/s one jitted step a call, the same with a scan of 10 a call, finite afterwards) at K = k."""
        pairs = [mog_pair(seed=s) for s in range(k)]
        once, many, state = jax_step.setup_population(pairs, 0.1, 0.07, device=device.type, scan_steps=10)
        once(), many()  # compiled outside the timing
        a, b = (k * per * 1e3 / bench(fn, host, rep_ms=rep_ms)[0] for fn, per in ((once, 1), (many, 10)))
        return a, b, jax_step.finite(state)

    solo = timed(1)[0]
    rows = [{"variant": "jax_solo", "members": 1, "member_steps_s": solo, "vs_solo": 1.0, **env}]
    for k in members:
        a, b, ok = timed(k)
        for variant, rate in (("jax_vmap", a), ("jax_vmap_scan", b)):
            rows.append({"variant": variant, "members": k, "member_steps_s": rate, "vs_solo": rate / solo, **env})
            note = "" if ok else " DIVERGED: timed non-finite arithmetic"
            print(
                f"{variant:13s} K={k:3d}: {rate:8.1f} member-steps/s ({rate / solo:.2f}x JAX solo's {solo:.1f}){note}"
            )
    append_csv(out, rows)
    return rows
