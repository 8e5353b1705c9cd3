"""Step time: what an ODE-GAN RK4 step costs, against its own parts and against the alternatives.

    python -m bench.step                  # CPU: toy MLP pair (batch 512), DCGAN at batch 8
    python -m bench.step --device cuda    # GPU: toy MLP pair, DCGAN at batch 64, with CUDA graphs
    python -m bench.step --device cuda --models resnet128 --dcgan-batch 32   # ImageNet's conditional pair
    python -m bench.step --members 1,4,16,64   # populations: member-steps/s against solo runs (bench/population.py)
    python -m bench.step --members 1,4 --models dcgan   # the DCGAN pair's population rows alone

Variants, all the joint RK4 step of the CIFAR-10 reference (penalty folded into stage 1, lambda 0.02) but the
colab rows:
  naive      a straightforward eager RK4 as public ports write it (per-tensor lists, separate forwards)
  ours       ODEStepper + game_gradients, eager
  ours_mlp   the same with the hand-derived gradients of a ReLU MLP pair (mlp_grads; toy pair only)
  ours_mlp_cs  ours_mlp with compile=True (the stepper's stage op through torch.compile), the engine eager
  ours_mlp_c   ... and the hand-derived engine compiled too (game/compiled.py)
  ours_mlp_step  the whole step traced as one graph: ODEStepper(compile="step"), the engine inside the trace
             (the run's compile=true with the hand-derived engine)
  graph      the same step captured in one CUDA graph (GPU)
  compile    torch.compile'd D and G inside our stepper (double backward through compiled code is
             reported if it fails; then the finite-difference penalty, which needs none, is used)
  parts      4 gradient evaluations + the penalty, each timed alone in the step's regime (eager, or each
             captured in its own graph for 'graph'): the step over this is the overhead ratio
  adam       one Adam step (one gradient evaluation + the optimizer); euler: an Euler ODE step
  jax_jit    the peer: the toy pair's same RK4 step in JAX (bench/jax_step.py), one jax.jit step per call
  jax_scan   the same, lax.scan of 100 steps in one call, per step (JAX's best case); both where jax imports,
             host-timed; on a GPU our graphed step is also host-timed for them (graph_sync, graph_x100)
  ours_colab, ours_colab_c, ours_colab_step, jax_colab_jit, jax_colab_scan
             the main job's own step (odegan train mog: the colab's decoupled RK4 step, one batch per step,
             g_reg after the step, h 0.1, lambda 0.07): ours eager and with compile=True (the latter with the
             compile rows), against the colab variant of the JAX peer; toy pair only, timed round-robin,
             host-timed (bench/colab_step.py; --no-colab skips them)
  pen:*      the gradient-penalty family: the joint RK4 step with one penalty (g_reg, r1, r2, wgan_gp,
             consensus; r1_lazy16: R1 every 16 steps, amortised) against pen:none, the same step without
             any, all through autograd and timed round-robin so a busy machine slows every row alike
             (--no-penalties skips them)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from odegan_kernels import FlatParams, ODEStepper, game_gradients
from odegan_kernels.contract import Stage, apply_penalties
from odegan_kernels.game import Batch, MLPPair, d_loss, g_loss
from odegan_kernels.game.compiled import CompiledEngine
from odegan_kernels.models import (
    ConditionalResNetDiscriminator,
    ConditionalResNetGenerator,
    DCGANDiscriminator,
    DCGANGenerator,
    ResNetDiscriminator,
    ResNetGenerator,
    mog_pair,
)

from . import jax_step
from .colab_step import colab_rows
from .common import (
    RESULTS,
    append_csv,
    bench,
    device_arg,
    environment,
    markdown_table,
    save_figure,
    sync,
)

# The CIFAR-10 reference's step size during its first 500 steps (h/4 of 0.04), and its lambda. At the full
# h a randomly initialised pair on random data diverges within tens of steps (measured for the ResNet),
# and a benchmark must not time non-finite arithmetic.
H, LAM = 0.04 / 4, 0.02


class WithLabels(torch.nn.Module):
    """A conditional player with its labels bound, so every variant below calls it as an unconditional one
    (the same labels at every stage: the cost is the same as fresh ones)."""

    def __init__(self, module: torch.nn.Module, y: torch.Tensor) -> None:
        super().__init__()
        self.module, self.y = module, y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x, self.y)


def make_models(name: str, device, batch: int):
    gen = torch.Generator().manual_seed(0)
    if name == "resnet128":  # SN-GAN's ImageNet widths at 128x128, 1000 classes
        torch.manual_seed(0)
        y = torch.randint(1000, (batch,), generator=gen).to(device)
        D = WithLabels(ConditionalResNetDiscriminator(num_classes=1000), y)
        G = WithLabels(ConditionalResNetGenerator(num_classes=1000), y)
        real = torch.rand(4, batch, 3, 128, 128, generator=gen) * 2 - 1
        z = torch.randn(4, batch, 128, generator=gen)
    elif name == "mlp":
        D, G = mog_pair()
        real = torch.randn(4, batch, 2, generator=gen)
        z = torch.randn(4, batch, 32, generator=gen)
    elif name == "resnet":
        torch.manual_seed(0)
        D, G = ResNetDiscriminator(), ResNetGenerator()
        real = torch.rand(4, batch, 3, 32, 32, generator=gen) * 2 - 1
        z = torch.randn(4, batch, 128, generator=gen)
    else:
        torch.manual_seed(0)
        D, G = DCGANDiscriminator(), DCGANGenerator()
        real = torch.rand(4, batch, 3, 32, 32, generator=gen) * 2 - 1
        z = torch.randn(4, batch, 128, generator=gen)
    return D.to(device), G.to(device), real.to(device), z.to(device)


# -- (a) the straightforward eager RK4 ----------------------------------------------------------------------
def naive_step(D, G, real, z):
    dps, gps = list(D.parameters()), list(G.parameters())
    x0 = [p.detach().clone() for p in dps + gps]
    ks = []
    for i in range(4):
        fake = G(z[i])
        ld = d_loss(D(real[i]), D(fake.detach()))
        gd = torch.autograd.grad(ld, dps)
        lg = g_loss(D(fake))
        if i == 0:
            gg = torch.autograd.grad(lg, gps, create_graph=True)
            pen = sum((g * g).sum() for g in gg)
            rg = torch.autograd.grad(pen, dps)
            gd = [a + LAM * 6 * b for a, b in zip(gd, rg)]
            gg = [g.detach() for g in gg]
        else:
            gg = torch.autograd.grad(lg, gps)
        ks.append(list(gd) + list(gg))
        frac = (0.5, 0.5, 1.0)[i] if i < 3 else None
        with torch.no_grad():
            for p, p0, k in zip(dps + gps, x0, ks[-1]):
                if frac is not None:
                    p.copy_(p0 - H * frac * k)
    with torch.no_grad():
        for j, (p, p0) in enumerate(zip(dps + gps, x0)):
            p.copy_(p0 - H / 6 * (ks[0][j] + 2 * ks[1][j] + 2 * ks[2][j] + ks[3][j]))


def stepper_for(D, G, method="rk4", cuda_graph=False):
    flat = FlatParams(D=D, G=G)
    st = ODEStepper(flat, method, h=H, reg=LAM, reg_at="first_stage", coupling="joint", cuda_graph=cuda_graph)
    return flat, st


def closure_for(D, G, real, z, reg_method="double_backward", engine="autograd"):
    def closure(stage):
        batch = Batch(real[stage.index], z[stage.index])
        return game_gradients(D, G, batch, "ns", stage.players, stage.penalties, reg_method=reg_method, engine=engine)

    return closure


def part_evaluations(flat, st, closure):
    """The step's parts: one plain gradient evaluation, and the stage-1 one with the penalty (and its
    backward into D's gradients)."""

    def plain():
        flat.zero_grad()
        closure(Stage(1, 0, (0, 1)))

    def with_penalty():
        flat.zero_grad()
        stage = Stage(0, 0, (0, 1), {"g_reg": st.reg})
        apply_penalties(closure(stage), flat, {"g_reg": st.reg_weight})  # as the step

    return plain, with_penalty


def graphed(fn, device, warmup=3):
    """fn captured in its own CUDA graph (after warm-up on a side stream); returns the replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s, capture_error_mode="thread_local"):
        fn()
    return g.replay


def run_model(
    name: str,
    device,
    batch: int,
    rows: list,
    env: dict,
    rep_ms: float,
    penalties: bool = True,
    only_pen: bool = False,
    compile_rows: bool = True,
    on_row=None,
    compiled_step: str = "on",
    colab: bool = True,
) -> None:
    """Every variant's rows for one model; on_row() (optional) is called after each row, so a caller can write them
    as they come: a run stopped at a time limit keeps what it measured."""
    is_cuda = device.type == "cuda"

    nan = float("nan")

    def row(variant, med=nan, p20=nan, p80=nan, peak=nan, note=""):
        rows.append(
            {
                "model": name,
                "batch": batch,
                "variant": variant,
                "median_ms": med,
                "p20_ms": p20,
                "p80_ms": p80,
                "peak_MB": peak,
                "note": note,
                **env,
            }
        )
        if on_row is not None:
            on_row()

    def record(variant, fn, note="", params=None):
        """Time fn; params (optional): tensors that must still be finite afterwards, or the timing is void."""
        if is_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        try:
            med, p20, p80 = bench(fn, device, warmup_ms=rep_ms / 4, rep_ms=rep_ms)
        except Exception as exc:
            print(f"{name:5s} {variant:10s} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
            row(variant, note=f"failed: {type(exc).__name__}")
            return nan
        if params is not None and not all(bool(torch.isfinite(p).all()) for p in params):
            note = (note + "; " if note else "") + "DIVERGED: timed non-finite arithmetic"
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if is_cuda else nan
        row(variant, med, p20, p80, peak, note)
        print(f"{name:5s} {variant:10s} {med:9.3f} ms  [{p20:.3f}, {p80:.3f}]  peak {peak:8.1f} MB {note}", flush=True)
        return med

    if only_pen:
        return record_penalty_rows(name, device, batch, rep_ms, row)
    if compiled_step == "only":  # compile=True against its eager self and JAX, nothing else (gpu_check's compiled-step)
        if name != "mlp":
            return None
        D, G, real, z = make_models(name, device, batch)
        flat_m, st_m = stepper_for(D, G)
        closure_m = closure_for(D, G, real, z, engine="mlp")
        record("ours_mlp", lambda: st_m.step(closure_m), "hand-derived gradients", params=[flat_m.params])
        if jax_step.available():
            record_jax_rows(name, device, batch, rep_ms, row)
        record_compiled_step_rows(name, device, batch, record)
        for variant, med, p20, p80, note in colab_rows(device, batch, rep_ms, compiled=True) if colab else ():
            row(variant, med, p20, p80, note=note)  # the main job's own step, eager, compiled and traced, and JAX's
            print(f"{name:5s} {variant:14s} {med:9.3f} ms  [{p20:.3f}, {p80:.3f}]  {note}", flush=True)
        return None
    D, G, real, z = make_models(name, device, batch)
    record("naive", lambda: naive_step(D, G, real, z), params=list(D.parameters()) + list(G.parameters()))

    D, G, real, z = make_models(name, device, batch)
    flat, st = stepper_for(D, G)
    closure = closure_for(D, G, real, z)
    record("ours", lambda: st.step(closure), params=[flat.params])

    # (e) the parts, eager: 3 plain evaluations + 1 with the penalty
    eval_plain, eval_pen = part_evaluations(flat, st, closure)
    t_plain = record("eval", eval_plain, "one gradient evaluation")
    t_pen = record("eval+pen", eval_pen, "stage-1 evaluation with the penalty")
    row("parts", 3 * t_plain + t_pen, note="3 x eval + eval+pen")

    if name == "mlp":  # the hand-derived gradients: the same step without autograd's per-op bookkeeping
        D, G, real, z = make_models(name, device, batch)
        flat_m, st_m = stepper_for(D, G)
        closure_m = closure_for(D, G, real, z, engine="mlp")
        record("ours_mlp", lambda: st_m.step(closure_m), "hand-derived gradients", params=[flat_m.params])
        eval_plain_m, eval_pen_m = part_evaluations(flat_m, st_m, closure_m)
        t_plain = record("eval_mlp", eval_plain_m, "one evaluation, hand-derived")
        t_pen = record("eval+pen_mlp", eval_pen_m, "with the penalty, hand-derived")
        row("parts_mlp", 3 * t_plain + t_pen, note="3 x eval_mlp + eval+pen_mlp")

    def captured(variant, make):
        """make() (warm-up and capture) guarded: a failed capture is a recorded row, not the end of the run."""
        try:
            return make()
        except Exception as exc:
            first = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            print(f"{name:5s} {variant:10s} capture failed: {first}", flush=True)
            row(variant, note=f"capture failed: {first}")
            return None

    if is_cuda:
        D, G, real, z = make_models(name, device, batch)
        flat_g, st_g = stepper_for(D, G, cuda_graph=True)
        closure_g = closure_for(D, G, real, z)

        def warm_and_capture():
            for _ in range(4):  # warm-up and capture, outside the timing
                st_g.step(closure_g)
            return lambda: st_g.step(closure_g)

        step_g = captured("graph", warm_and_capture)
        if step_g is not None:
            record("graph", step_g, params=[flat_g.params])
        eval_plain_g, eval_pen_g = part_evaluations(flat_g, st_g, closure_g)
        replay_plain = captured("eval_g", lambda: graphed(eval_plain_g, device))
        replay_pen = captured("eval+pen_g", lambda: graphed(eval_pen_g, device))
        tp = record("eval_g", replay_plain, "one evaluation, own graph") if replay_plain else nan
        tq = record("eval+pen_g", replay_pen, "penalty evaluation, own graph") if replay_pen else nan
        row("parts_g", 3 * tp + tq, note="3 x eval_g + eval+pen_g")

    if name == "mlp" and jax_step.available():  # the peer: the same step in JAX, from the same start and data
        record_jax_rows(name, device, batch, rep_ms, row, step_g if is_cuda else None)
    # the main job's own step (the colab's), ours against JAX's, round-robin (bench/colab_step.py)
    if name == "mlp" and colab:
        for variant, med, p20, p80, note in colab_rows(
            device, batch, rep_ms, compiled=compile_rows and compiled_step == "on"
        ):
            row(variant, med, p20, p80, note=note)
            print(f"{name:5s} {variant:14s} {med:9.3f} ms  [{p20:.3f}, {p80:.3f}]  {note}", flush=True)

    # (f) Adam and Euler on the same model
    D, G, real, z = make_models(name, device, batch)
    flat_a = FlatParams(D=D, G=G)
    adam = torch.optim.Adam(flat_a.parameters(), lr=1e-4, betas=(0.5, 0.999), fused=is_cuda or None)

    def adam_step():
        flat_a.zero_grad()
        game_gradients(D, G, Batch(real[0], z[0]))
        adam.step()

    record("adam", adam_step, params=[flat_a.params])
    D, G, real, z = make_models(name, device, batch)
    flat_e, st_e = stepper_for(D, G, method="euler")
    cl_e = closure_for(D, G, real, z)
    record("euler", lambda: st_e.step(cl_e), params=[flat_e.params])
    sync(device)
    if penalties:
        record_penalty_rows(name, device, batch, rep_ms, row)
    # (d) torch.compile, last (a run stopped at its time limit loses these first): compiled modules in our stepper,
    # compiled once per model (a cold Inductor compile of an image model costs 30-90 s): when the double backward
    # fails, the same compiled modules and stepper run the finite-difference penalty, which needs none. The shared
    # forward retains D's graph for the second backward, which compiled backwards with donated buffers refuse; the
    # error tells users to turn them off.
    if compile_rows:
        if name == "mlp" and compiled_step == "on":
            record_compiled_step_rows(name, device, batch, record)
        record_compile_rows(name, device, batch, record, row)


def record_compiled_step_rows(name: str, device, batch: int, record) -> None:
    """compile=True (issue 21): the stepper's compiled stage op under the hand-derived engine (eager, then compiled
    too), the first step (the cold or warm compile) outside the timing; the seconds it took go in the note."""
    # the whole traced step first: on a GPU the check's time limit may cut the rows after it (each prints as it ends)
    kinds = (("ours_mlp_step", "step", False), ("ours_mlp_cs", True, False), ("ours_mlp_c", True, True))
    for variant, compile, compiled_engine in kinds:
        D, G, real, z = make_models(name, device, batch)
        flat = FlatParams(D=D, G=G)
        st = ODEStepper(flat, "rk4", h=H, reg=LAM, reg_at="first_stage", coupling="joint", compile=compile)
        engine = CompiledEngine(MLPPair(D, G)) if compiled_engine else MLPPair(D, G)

        def closure(stage, real=real, z=z, engine=engine):
            return engine(Batch(real[stage.index], z[stage.index]), stage.players, stage.penalties)

        t0 = time.perf_counter()
        st.step(closure)
        st.step(closure)  # compile="step": the first step runs eagerly, the second traces
        first = time.perf_counter() - t0
        what = "stage op and hand-derived engine compiled" if compiled_engine else "stage op compiled, engine eager"
        what = "the whole step traced as one graph (compile='step')" if compile == "step" else what
        record(variant, lambda: st.step(closure), f"{what}; first two steps {first:.0f} s", params=[flat.params])


def record_compile_rows(name: str, device, batch: int, record, row) -> None:
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    D, G, real, z = make_models(name, device, batch)
    flat_c, st_c = stepper_for(D, G)
    Dc, Gc = torch.compile(D), torch.compile(G)
    start = flat_c.params.clone()
    try:
        cl = closure_for(Dc, Gc, real, z)
        st_c.step(cl)
        record("compile", lambda: st_c.step(cl), "double backward through compiled modules", params=[flat_c.params])
        return
    except Exception as exc:
        first = str(exc).splitlines()[0][:120]
        print(f"{name:5s} compile    double backward failed: {first}", flush=True)
        row("compile", note=f"double backward fails: {first}")
    with torch.no_grad():
        flat_c.params.copy_(start)  # whatever the failed step left (the stepper rolls back too)
    try:
        cl = closure_for(Dc, Gc, real, z, reg_method="finite_difference")
        st_c.step(cl)
        note = "compiled modules (compiled once, reused from the failed attempt), finite-difference penalty"
        record("compile_fd", lambda: st_c.step(cl), note, params=[flat_c.params])
    except Exception as exc:
        first = str(exc).splitlines()[0][:120]
        print(f"{name:5s} compile_fd failed: {first}", flush=True)
        row("compile_fd", note=f"fails: {first}")


def record_jax_rows(name: str, device, batch: int, rep_ms: float, row, graph_step=None) -> None:
    """jax_jit (one jitted step per call) and jax_scan (lax.scan of SCAN steps in one call, per step) of the toy
    pair's RK4 step, with how far one step lands from ours on the timed device; a failure is a recorded row,
    not the end of the run.

    Both are host-timed, each call ending in block_until_ready. On a GPU our rows above are timed by CUDA events
    (triton's do_bench), so for a like-for-like ratio our graphed step is timed here the same way: graph_sync
    (one replay and a synchronize per call, against jax_jit) and graph_x{SCAN} (SCAN replays, one synchronize,
    per step, against jax_scan)."""
    D, G, real, z = make_models(name, device, batch)
    host = torch.device("cpu")  # bench()'s host-clock path

    def timed(fn, per=1):
        return [v / per for v in bench(fn, host, warmup_ms=rep_ms / 4, rep_ms=rep_ms)]

    try:
        err = jax_step.check_against_ours(H, LAM, batch, device=device.type)
        once, many, state = jax_step.setup(D, G, real, z, H, LAM, device.type, scan_steps=SCAN)
        once(), many()  # compile outside the timing
        t, u = timed(once), timed(many, SCAN)
    except Exception as exc:
        first = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        print(f"{name:5s} jax        failed: {first}", flush=True)
        row("jax_jit", note=f"failed: {first}")
        return
    import jax

    note = f"jax {jax.__version__}; same start and data as ours, {err:.1e} from ours after 3 steps (max rel, fp32)"
    if not jax_step.finite(state):
        note += "; DIVERGED: timed non-finite arithmetic"
    out = [
        ("jax_jit", t, f"jax.jit step, host-timed; {note}"),
        ("jax_scan", u, f"lax.scan of {SCAN}, per step; {note}"),
    ]
    if graph_step is not None:

        def sync_once():
            graph_step()
            torch.cuda.synchronize(device)

        def sync_many():
            for _ in range(SCAN):
                graph_step()
            torch.cuda.synchronize(device)

        out += [
            ("graph_sync", timed(sync_once), "our graphed step, host-timed with a sync per call (vs jax_jit)"),
            (f"graph_x{SCAN}", timed(sync_many, SCAN), f"{SCAN} replays then one sync, per step (vs jax_scan)"),
        ]
    for variant, (med, p20, p80), what in out:
        row(variant, med, p20, p80, note=what)
        print(f"{name:5s} {variant:10s} {med:9.3f} ms  [{p20:.3f}, {p80:.3f}]  {what}", flush=True)


SCAN = 100  # steps per lax.scan call


def record_penalty_rows(name: str, device, batch: int, rep_ms: float, row) -> None:
    for variant, med, p20, p80, note in penalty_rows(name, device, batch, rep_ms):
        row(variant, med, p20, p80, note=note)
        print(f"{name:5s} {variant:14s} {med:9.3f} ms  [{p20:.3f}, {p80:.3f}] {note}", flush=True)


# (g) the gradient-penalty family: (variant, g_reg's lambda, the field penalties)
PENALTY_VARIANTS = (
    ("pen:none", 0.0, {}),
    ("pen:g_reg", LAM, {}),
    ("pen:r1", 0.0, {"r1": 1.0}),
    ("pen:r2", 0.0, {"r2": 1.0}),
    ("pen:wgan_gp", 0.0, {"wgan_gp": 1.0}),
    ("pen:consensus", 0.0, {"consensus": 0.1}),
    ("pen:r1_lazy16", 0.0, {"r1": (1.0, 16)}),
)


def penalty_rows(name: str, device, batch: int, rep_ms: float, rounds: int = 5) -> list[tuple]:
    """(variant, median, p20, p80, note) of each penalty's RK4 step, timed in ``rounds`` round-robin passes over
    the variants (the median of each pass's median), so load on a shared machine hits every variant alike."""
    import statistics

    steps = {}
    for variant, reg, pens in PENALTY_VARIANTS:
        D, G, real, z = make_models(name, device, batch)
        flat = FlatParams(D=D, G=G)
        st = ODEStepper(flat, "rk4", h=H, reg=reg, penalties=pens)
        gen = torch.Generator(device=device).manual_seed(0)  # WGAN-GP's interpolation weights

        def closure(stage, D=D, G=G, real=real, z=z, gen=gen):
            batch = Batch(real[stage.index], z[stage.index])
            return game_gradients(D, G, batch, "ns", stage.players, stage.penalties, generator=gen)

        steps[variant] = (lambda st=st, cl=closure: st.step(cl), flat)
    times: dict[str, list[float]] = {v: [] for v in steps}
    for _ in range(rounds):
        for variant, (fn, _) in steps.items():
            times[variant].append(bench(fn, device, warmup_ms=rep_ms / (4 * rounds), rep_ms=rep_ms / rounds)[0])
    out = []
    for variant, ts in times.items():
        q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else ts * 4
        finite = bool(torch.isfinite(steps[variant][1].params).all())
        out.append((variant, statistics.median(ts), q[0], q[-1], "" if finite else "DIVERGED: timed non-finite"))
    return out


def report(rows: list[dict], out: Path, env: dict, threads: int | None = None, plot: bool = True) -> None:
    md = [
        f"# Step benchmark\n\n{env['device']} · torch {env['torch']} · triton {env['triton']} · {env['date']}\n",
        f"Command: `{env['command']}`\n",
        (
            f"On a CPU every model ran on {threads} thread(s) (--threads).\n"
            if threads
            else "On a CPU the toy pair runs on one thread (it is 1.7x slower on two) and DCGAN on all of them.\n"
        ),
        markdown_table(rows, ["model", "batch", "variant", "median_ms", "p20_ms", "p80_ms", "peak_MB", "note"]),
        "\n## Ratios (same run)\n",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        t = {r["variant"]: r["median_ms"] for r in rows if r["model"] == model}

        def ratio(a, b, what):
            if a in t and b in t and t[a] == t[a] and t[b] == t[b]:
                md.append(f"- {model}: {what}: {t[a] / t[b]:.3f}")

        ratio("ours", "parts", "eager step / sum of its parts (overhead ratio, eager)")
        ratio("ours_mlp", "parts_mlp", "hand-derived step / sum of its parts (overhead ratio)")
        ratio("ours", "ours_mlp", "ours autograd / ours hand-derived (speed-up)")
        ratio("naive", "ours_mlp", "straightforward eager RK4 / ours hand-derived (speed-up)")
        ratio("graph", "parts_g", "graph step / sum of its parts each in its own graph (target <= 1.05)")
        ratio("naive", "ours", "straightforward eager RK4 / ours eager (speed-up)")
        ratio("naive", "graph", "straightforward eager RK4 / ours with the graph (speed-up)")
        ratio("compile", "graph", "torch.compile / ours with the graph")
        ratio("compile_fd", "ours", "torch.compile (FD penalty) / ours eager")
        ratio("ours_mlp", "jax_jit", "ours hand-derived / JAX jit step (< 1: we are faster)")
        ratio("ours_mlp", "jax_scan", "ours hand-derived / JAX lax.scan per step (< 1: we are faster)")
        ratio("graph_sync", "jax_jit", "ours with the graph / JAX jit step, both host-timed (target <= 1)")
        ratio(f"graph_x{SCAN}", "jax_scan", f"ours, {SCAN} graph replays / JAX lax.scan, per step (target <= 1)")
        ratio("ours_colab", "jax_colab_jit", "the main job's step, ours / JAX jit (colab variant; < 1: we are faster)")
        ratio("ours_colab", "jax_colab_scan", "the main job's step, ours / JAX lax.scan per step (colab variant)")
        ratio("ours_colab_c", "jax_colab_jit", "the main job's step compiled (compile=True) / JAX jit (colab variant)")
        ratio("ours_colab_c", "ours_colab", "the main job's step, compile=True / eager")
        ratio("ours_colab_step", "jax_colab_jit", "the main job's step traced (compile='step') / JAX jit (colab)")
        ratio("ours_colab_step", "ours_colab", "the main job's step, traced (compile='step') / eager")
        ratio("ours_mlp_step", "jax_jit", "the toy step traced (compile='step') / JAX jit step (goal: <= 1)")
        ratio("ours_mlp_step", "ours_mlp", "the toy step traced (compile='step') / eager hand-derived")
        ratio("ours", "adam", "ODE RK4 step / Adam step")
        ratio("euler", "adam", "ODE Euler step / Adam step")
        for variant, *_ in PENALTY_VARIANTS[1:]:
            ratio(variant, "pen:none", f"RK4 step with {variant[4:]} / the same step without penalties")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    if not plot:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        models = list(dict.fromkeys(r["model"] for r in rows))
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4))
        axes = [axes] if len(models) == 1 else axes
        for ax, m in zip(axes, models):
            rs = [r for r in rows if r["model"] == m and r["median_ms"] == r["median_ms"]]
            ax.barh([r["variant"] for r in rs], [r["median_ms"] for r in rs])
            ax.set_xlabel("ms per call (median)")
            ax.set_title(f"{m} (batch {rs[0]['batch']})")
        save_figure(fig, out.with_suffix(".png"), env["device"])
    except Exception as exc:
        print(f"plot skipped: {exc}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--models", default=None, help="default: mlp,dcgan on a CPU; mlp,dcgan,resnet on a GPU; also resnet128"
    )
    ap.add_argument("--dcgan-batch", type=int, default=None, help="batch of the image models")
    ap.add_argument("--rep-ms", type=float, default=None)
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads for every model (default: 1 for mlp, all for the rest)"
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-penalties", action="store_true", help="skip the gradient-penalty rows (pen:*)")
    ap.add_argument("--penalties-only", action="store_true", help="only the gradient-penalty rows (pen:*)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (a cold compile each)")
    ap.add_argument(
        "--compiled-step",
        choices=("on", "off", "only"),
        default="on",
        help="the toy pair's compile=True rows (ours_mlp_cs, ours_mlp_c): with the compile rows (on), not at all, or "
        "only them beside ours_mlp and JAX",
    )
    ap.add_argument("--penalty-models", default=None, help="models that get the pen:* rows (default: every model)")
    ap.add_argument("--compile-models", default=None, help="models that get the compile rows (default: every model)")
    ap.add_argument(
        "--model-batch", default="", help="batch per model, e.g. resnet128=32 (default: --dcgan-batch or 64/8)"
    )
    ap.add_argument("--no-plot", action="store_true", help="write the CSV and the markdown table only")
    ap.add_argument("--members", default=None, help="population rows instead, e.g. 1,4,16,64 (bench/population.py)")
    ap.add_argument("--no-colab", action="store_true", help="skip the main job's colab rows (ours_colab, jax_colab_*)")
    ap.add_argument("--no-jax-vmap", action="store_true", help="--members: skip JAX's vmap rows (jax_solo, jax_vmap*)")
    args = ap.parse_args(argv)
    if args.members is not None:
        from .population import run as population_rows

        try:
            ks = [int(k) for k in args.members.split(",")]
        except ValueError:
            ks = [0]
        if not ks or min(ks) < 1:
            ap.error(f"--members takes population sizes >= 1, e.g. 1,4,16,64; got {args.members!r}")
        pairs = tuple((args.models or "mlp,dcgan").split(","))
        if not set(pairs) <= {"mlp", "dcgan"}:
            ap.error(f"--members takes --models mlp, dcgan or mlp,dcgan (the population pairs); got {args.models!r}")
        out = Path(args.out) if args.out else None
        dev, rep = device_arg(ap, args.device), args.rep_ms or 1500
        return population_rows(ks, dev, out, rep, table=not args.no_plot, models=pairs, jax=not args.no_jax_vmap)
    known = ("mlp", "dcgan", "resnet", "resnet128")
    bad = [m for m in (args.models or "").split(",") if args.models and m not in known]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {known}")
    if args.no_penalties and args.penalties_only:
        ap.error("--no-penalties and --penalties-only contradict each other: give one")
    model_batch = {}
    for item in filter(None, args.model_batch.split(",")):
        m, _, b = item.partition("=")
        if m not in known or not b.isdigit() or int(b) < 1:
            ap.error(f"--model-batch takes MODEL=BATCH pairs with MODEL in {known} and BATCH >= 1, got {item!r}")
        model_batch[m] = int(b)
    for name in ("rep_ms", "threads", "dcgan_batch"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {v}")
    device = device_arg(ap, args.device)
    cores = torch.get_num_threads()
    env = environment(device)
    rows: list[dict] = []
    rep = args.rep_ms or (300 if device.type == "cuda" else 1500)
    models = args.models or ("mlp,dcgan,resnet" if device.type == "cuda" else "mlp,dcgan")
    out = Path(args.out) if args.out else RESULTS / f"step_{device.type}.csv"
    written = 0

    def flush() -> None:  # after every row, so a run stopped at a time limit keeps what it measured
        nonlocal written
        append_csv(out, rows[written:])
        written = len(rows)
        report(rows, out, env, args.threads, plot=False)

    for m in models.split(","):
        if device.type == "cpu":  # the toy's tiny matrices run fastest on one thread (1.7x slower on two)
            torch.set_num_threads(args.threads or (1 if m == "mlp" else cores))
        batch = model_batch.get(m) or (
            512 if m == "mlp" else (args.dcgan_batch or (64 if device.type == "cuda" else 8))
        )
        pens = not args.no_penalties and (args.penalty_models is None or m in args.penalty_models.split(","))
        comp = not args.no_compile and (args.compile_models is None or m in args.compile_models.split(","))
        what = (pens, args.penalties_only, comp, flush, args.compiled_step, not args.no_colab)
        run_model(m, device, batch, rows, env, rep, *what)
        report(rows, out, env, args.threads, plot=not args.no_plot)
    print(f"wrote {out}, {out.with_suffix('.md')}" + ("" if args.no_plot else f", {out.with_suffix('.png')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
