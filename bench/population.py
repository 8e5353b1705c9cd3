"""Populations: member-steps per second of K members trained as one batched run, against K solo runs.

    python -m bench.step --members 1,4,16,64           # CPU: the toy pair (the mog preset's RK4 step)
    python -m bench.step --members 1,4,16,64 --device cuda

Rows (one per K and engine): ``pop_mlp`` (the hand-derived engine, batched), ``pop_autograd`` (vmap of
functional_call), against ``solo_mlp`` / ``solo_autograd`` (one run's steps per second: K solo runs cost K times a
step). The population's gain is ``pop / solo`` member-steps per second. ``pop_dcgan_b{B}``: the CIFAR-10 DCGAN pair
(bench/step.py's make_models; its G's BatchNorm running statistics per member) at batch B per stage (8 on a CPU, 64
on a GPU), the CIFAR reference's step (RK4, joint, g_reg at the first stage) through FlatParams(members=K),
PopulationAutograd and ODEStepper, against ``solo_dcgan_b{B}``: one DCGAN run's steps per second (bench/step.py's
``ours`` row). On a CPU the DCGAN rows take K <= 4 (DCGAN_CPU_MAX_MEMBERS, below). ``--models mlp`` or
``--models dcgan`` keeps one pair's rows. ``jax_vmap`` / ``jax_vmap_scan`` / ``jax_solo`` (toy pair, where jax
imports; jax_rows below): JAX's vmap of the same step (bench/jax_step.py); ``--no-jax-vmap`` leaves them out.
"""

from __future__ import annotations

from pathlib import Path

import torch

from odegan_kernels.flat import FlatParams
from odegan_kernels.game import Batch, PopulationAutograd
from odegan_kernels.models import DCGANDiscriminator, DCGANGenerator
from odegan_kernels.ode import ODEStepper
from odegan_kernels.problems import build_problem
from odegan_kernels.train.baselines import build_optimizer
from odegan_kernels.train.closure import GameClosure
from odegan_kernels.train.config import make_config
from odegan_kernels.train.population import Population
from odegan_kernels.train.state import RandomStreams

from .common import RESULTS, append_csv, bench, environment, markdown_table, sync
from .step import LAM, H, closure_for, make_models, stepper_for

# The DCGAN's K on a CPU: a K=4 step at batch 8 costs about 4 solo steps (a solo step: 0.64 s on a quiet 2-core
# machine, bench/results/step_cpu.md; the K=4 step took 31 s with this machine loaded), and a row times >= 7 steps.
DCGAN_CPU_MAX_MEMBERS = 4


def _solo_step(cfg):
    problem = build_problem(cfg.problem, cfg)
    flat = FlatParams(D=problem.D, G=problem.G, dtype=cfg.torch_dtype)
    opt, _ = build_optimizer(cfg, flat)
    streams = RandomStreams(cfg.seed, 0, cfg.device)
    closure = GameClosure(cfg, problem, streams.data, streams.z)
    return lambda: opt.step(closure)


def _dcgan_population_step(k: int, device: torch.device, batch: int):
    """K DCGAN pairs (member s initialised from seed s) as one population, with the CIFAR reference's step at the
    benchmark's h and lambda (bench/step.py's H, LAM), on fixed random data: [4 stages, K, batch, ...]."""
    pairs = []
    for s in range(k):
        torch.manual_seed(s)
        pairs.append((DCGANDiscriminator().to(device), DCGANGenerator().to(device)))
    gen = torch.Generator().manual_seed(0)
    real = (torch.rand(4, k, batch, 3, 32, 32, generator=gen) * 2 - 1).to(device)
    z = torch.randn(4, k, batch, 128, generator=gen).to(device)
    flat = FlatParams(D=[d for d, _ in pairs], G=[g for _, g in pairs], members=k)
    st = ODEStepper(flat, "rk4", h=[H] * k, reg=[LAM] * k, reg_at="first_stage", coupling="joint")
    engine = PopulationAutograd(flat, *pairs[0])

    def closure(stage):
        return engine(Batch(real[stage.index], z[stage.index]), stage.players, stage.penalties)

    return flat, lambda: st.step(closure)


def dcgan_rows(
    members: list[int], device: torch.device, rep_ms: float, env: dict, out: Path, batch: int | None = None
) -> list[dict]:
    """The DCGAN pair's rows: one solo run's steps/s, then each population's member-steps/s (written as they come),
    at batch 64 on a GPU and 8 on a CPU unless given. A run whose parameters end non-finite (timed non-finite
    arithmetic) has ``_DIVERGED`` in its variant."""
    batch = batch or (64 if device.type == "cuda" else 8)
    ks = members if device.type == "cuda" else [k for k in members if k <= DCGAN_CPU_MAX_MEMBERS]
    if len(ks) < len(members):
        print(f"dcgan: K > {DCGAN_CPU_MAX_MEMBERS} left out on a CPU ({sorted(set(members) - set(ks))})")
    D, G, real, z = make_models("dcgan", device, batch)
    flat, st = stepper_for(D, G)
    closure = closure_for(D, G, real, z)
    med, _, _ = bench(lambda: st.step(closure), device, rep_ms=rep_ms)
    solo = 1e3 / med
    name = f"dcgan_b{batch}"
    bad = "" if bool(torch.isfinite(flat.params).all()) else "_DIVERGED"
    rows = [{"variant": f"solo_{name}{bad}", "members": 1, "member_steps_s": solo, "vs_solo": 1.0, **env}]
    print(f"{name:8s} solo: {solo:8.2f} steps/s{bad}")
    append_csv(out, rows)
    for k in ks:
        pflat, step = _dcgan_population_step(k, device, batch)
        med, _, _ = bench(step, device, rep_ms=rep_ms)
        rate = k * 1e3 / med
        bad = "" if bool(torch.isfinite(pflat.params).all()) else "_DIVERGED"
        rows.append(
            {"variant": f"pop_{name}{bad}", "members": k, "member_steps_s": rate, "vs_solo": rate / solo, **env}
        )
        append_csv(out, rows[-1:])
        print(f"{name:8s} K={k:3d}: {rate:8.2f} member-steps/s ({rate / solo:.2f}x solo's {solo:.2f}){bad}")
        sync(device)
    return rows


def run(
    members: list[int],
    device: torch.device,
    out: Path | None,
    rep_ms: float,
    table: bool = True,
    models: tuple[str, ...] = ("mlp", "dcgan"),
    jax: bool = True,
) -> int:
    cores = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # the toy's tiny matrices run fastest on one thread
    env = environment(device)
    out = out or RESULTS / f"population_{device.type}.csv"
    rows = []
    for grads in ("mlp", "autograd") if "mlp" in models else ():
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
    if jax and "mlp" in models:  # JAX's vmap of the toy pair's step (--no-jax-vmap: not)
        rows += jax_rows(members, device, rep_ms, env, out)
    if "dcgan" in models:
        torch.set_num_threads(cores)  # the convolutions run on every core, as bench/step.py's DCGAN rows
        rows += dcgan_rows(members, device, rep_ms, {**env, "device": environment(device)["device"]}, out)
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
