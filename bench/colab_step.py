"""The main job's step (``odegan train mog``: the colab's decoupled RK4 step, one batch per step, g_reg after the
step) timed ours against the JAX peer's, round-robin in one process: bench/step.py's colab rows (issue 21).

  ours_colab      ODEStepper(coupling="decoupled", reg_at="after_step") with the hand-derived engine and the
                  trainer's closure logic (D-only stages reuse the samples G drew at stage 0), eager
  ours_colab_c    the same with compile=True (the stage op and the engine through torch.compile, each call its
                  own graph); its first step (a cold or warm Inductor compile) outside the timing
  ours_colab_step the same with compile="step": the whole step traced as one graph (the run's
                  ``--set compile=true``); its first two steps (eager, then the trace) outside the timing
  jax_colab_jit   bench/jax_step.py's colab step, one ``jax.jit`` step per call
  jax_colab_scan  the same, ``lax.scan`` of 100 steps per call, per step

All from the same start (the mog preset's pair) and the same batch, at the preset's h 0.1 and lambda 0.07; every
row is host-timed (on a GPU each call ends in a synchronize, as JAX's end in block_until_ready) in ``rounds``
passes over the rows, the median of each pass's median, so a busy machine slows every row alike.
"""

from __future__ import annotations

import statistics
import time

import torch

from odegan_kernels import FlatParams, ODEStepper
from odegan_kernels.game import Batch, MLPPair
from odegan_kernels.game.compiled import CompiledEngine
from odegan_kernels.models import mog_pair

from . import jax_step
from .common import bench

H, LAM = 0.1, 0.07  # the mog preset's (MOG_COLAB in odegan_kernels/train/config.py)
SCAN = 100


def colab_data(batch: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of the 16-Gaussian mixture and one z, as the main job draws them for a step."""
    from odegan_kernels.data import MixtureOfGaussians

    gen = torch.Generator().manual_seed(seed)
    real = MixtureOfGaussians().sample(batch, gen)
    return real.to(device), torch.randn(batch, 32, generator=gen).to(device)


def ours_colab(D, G, real, z, h: float = H, lam: float = LAM, compile: bool | str = False):
    """(step(), flat): the main job's step on a fixed batch. The closure is the trainer's (train/closure.py) for
    ``data_per_stage="shared"``: one batch for all stages, and D's decoupled stages given the samples G drew at
    stage 0 (G is frozen at the step's start there, so they are the samples it would draw again)."""
    flat = FlatParams(D=D, G=G)
    st = ODEStepper(flat, "rk4", h=h, reg=lam, reg_at="after_step", coupling="decoupled", compile=compile)
    engine = CompiledEngine(MLPPair(D, G)) if compile is True else MLPPair(D, G)
    fake0 = [None]

    def closure(stage):
        fake = fake0[0] if stage.players == (0,) else None
        out = engine(Batch(real, z, fake=fake), stage.players, stage.penalties, losses=stage.index == 0)
        if stage.index == 0:
            fake0[0] = out.fake
        out.fake = None
        return out

    return (lambda: st.step(closure)), flat


def colab_rows(device, batch: int = 512, rep_ms: float = 1500, rounds: int = 5, compiled: bool = False) -> list[tuple]:
    """(variant, median ms, p20, p80, note) of each colab row (ours_colab_c only when ``compiled``; the JAX rows
    where jax imports), timed round-robin; a row that fails to build is a row with its reason."""
    is_cuda = device.type == "cuda"
    real, z = colab_data(batch, device)
    steps, notes, checks = {}, {}, {}

    def synced(fn):
        if not is_cuda:
            return fn

        def call():
            fn()
            torch.cuda.synchronize(device)

        return call

    D, G = (m.to(device) for m in mog_pair())
    fn, flat = ours_colab(D, G, real, z)
    steps["ours_colab"], notes["ours_colab"] = (synced(fn), 1), "hand-derived engine, eager; the trainer's closure"
    checks["ours_colab"] = lambda flat=flat: bool(torch.isfinite(flat.params).all())
    failed = []
    kinds = (("ours_colab_c", True, "compile=True, stage op and engine compiled"),
             ("ours_colab_step", "step", "compile='step', the whole step one graph"))  # fmt: skip
    for variant, kind, what in kinds if compiled else ():
        try:
            D, G = (m.to(device) for m in mog_pair())
            fn, flat_c = ours_colab(D, G, real, z, compile=kind)
            t0 = time.perf_counter()
            fn(), fn()  # (compile="step": the first step runs eagerly, the second traces)
            note = f"{what}; first steps {time.perf_counter() - t0:.0f} s"
            steps[variant], notes[variant] = (synced(fn), 1), note
            checks[variant] = lambda flat=flat_c: bool(torch.isfinite(flat.params).all())
        except Exception as exc:
            failed.append((variant, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
    if jax_step.available():
        try:
            err = jax_step.check_against_ours(H, LAM, batch, device=device.type, variant="colab")
            D, G = mog_pair()
            once, many, state = jax_step.setup(D, G, real, z, H, LAM, device.type, SCAN, variant="colab")
            once(), many()  # compiled outside the timing
            import jax

            note = f"jax {jax.__version__}; {err:.1e} from ours after 3 steps (max rel, fp32)"
            steps["jax_colab_jit"], notes["jax_colab_jit"] = (once, 1), f"jax.jit step per call; {note}"
            steps["jax_colab_scan"], notes["jax_colab_scan"] = (many, SCAN), f"lax.scan of {SCAN}, per step; {note}"
            checks["jax_colab_jit"] = checks["jax_colab_scan"] = lambda state=state: jax_step.finite(state)
        except Exception as exc:
            failed.append(("jax_colab_jit", f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
    host = torch.device("cpu")  # bench()'s host-clock path, for every row alike
    times: dict[str, list[float]] = {v: [] for v in steps}
    for _ in range(rounds):
        for variant, (fn, per) in steps.items():
            med = bench(fn, host, warmup_ms=rep_ms / (4 * rounds), rep_ms=rep_ms / rounds)[0]
            times[variant].append(med / per)
    out = []
    for variant, ts in times.items():
        q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else ts * 4
        note = notes[variant] + ("" if checks[variant]() else "; DIVERGED: timed non-finite arithmetic")
        out.append((variant, statistics.median(ts), q[0], q[-1], note))
    nan = float("nan")
    return out + [(v, nan, nan, nan, why) for v, why in failed]
