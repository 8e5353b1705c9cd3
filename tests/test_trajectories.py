"""Trajectories recorded before the restructuring (and every later move): the same runs must reach the
same parameters, on this machine bit for bit, and on any x86-64 CPU within a tolerance measured per case.

Each case runs a short training through the public API and reduces the final flat parameters to a
fingerprint (sum, sum of squares, two fixed random projections) plus a SHA-256 of their bytes.

Portability. Another CPU rounds differently in the last bits (AVX2 or AVX-512 kernels, another BLAS path), and a
GAN's dynamics amplify a difference of one ulp. So every case makes its start point and its data in its own dtype
(a float64 case never starts from a float32 pair cast up), and its tolerance is measured, not tuned:
``--record`` runs the case again with its start point nudged by one ulp (each parameter to a neighbouring float,
``NUDGES`` random patterns) and with one-ulp noise on every gradient evaluation, and stores the largest distance
the fingerprint moved (its *sensitivity*, relative to the fingerprint's scale). The test allows ``MARGIN`` times
that. ``test_a_change_of_h_or_lambda_is_caught`` checks that the guard still sees a real change: a 1e-6 relative
change of the step size or of lambda moves every case by more than its tolerance;
``test_the_guard_holds_with_other_cpu_kernels`` runs every case where torch and MKL take other code paths
(``ATEN_CPU_CAPABILITY=default``, ``MKL_CBWR=COMPATIBLE``: what another CPU does) and checks they still pass.

    python tests/test_trajectories.py --check     # bit-identical here? and within tolerance?
    python tests/test_trajectories.py --record    # rewrite tests/data/trajectories.json (only on purpose)
    python tests/test_trajectories.py --margins   # how far each case is from failing, in tolerances
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

sys.path.insert(0, str(Path(__file__).resolve().parent))

from odegan_kernels import Batch, FlatParams, ODEStepper, game_gradients  # noqa: E402
from odegan_kernels.models import mog_pair  # noqa: E402
from odegan_kernels.ode import cifar_schedule  # noqa: E402
from odegan_kernels.train import Trainer, make_config  # noqa: E402

RECORD = Path(__file__).resolve().parent / "data" / "trajectories.json"
NUDGES = 6  # random one-ulp patterns per perturbation kind when measuring a case's sensitivity
# The tolerance, in sensitivities: a case passes within MARGIN x the largest one-ulp effect measured. float32 runs
# of ReLU networks are chaotic in a heavy-tailed way (a nudge that moves a sample across a ReLU's kink moves the
# trajectory far more than one that does not: over 20 patterns of trainer_mog_joint, 9 moved it < 1% of the
# largest of the 12 recorded ones, 3 moved it 85-103%), so their margin is wider; their float64 twins
# (sensitivities ~1e-15) are the fine guard, and float32 cases catch only coarse changes (CHANGE).
MARGIN = {"float64": 30, "float32": 100}
# The relative change that must be caught, by dtype: of h and of lambda in float64; of h in float32 (a 2-step
# image run in float32 cannot see a 10% change of lambda through its rounding noise; its float64 twin can).
CHANGE = {"float64": 1e-6, "float32": 0.1}


@dataclasses.dataclass(frozen=True)
class Variation:
    """How a case's run departs from the recorded one: ``nudge``, the seed of a one-ulp nudge of every start
    parameter; ``noise``, the seed of one-ulp noise on the gradients at every evaluation; ``h`` and ``reg``,
    multipliers of the step size (lr for Adam/SGD) and of lambda."""

    nudge: int | None = None
    noise: int | None = None
    h: float = 1.0
    reg: float = 1.0


SAME = Variation()


def fingerprint(params: torch.Tensor) -> dict:
    p = params.detach().double().cpu()
    gen = torch.Generator().manual_seed(99)
    w1, w2 = torch.randn(2, p.numel(), generator=gen, dtype=torch.float64)
    return {
        "dtype": str(params.dtype).removeprefix("torch."),
        "numel": p.numel(),
        "values": [float(p.sum()), float((p * p).sum()), float(p @ w1), float(p @ w2)],
        "sha256": hashlib.sha256(params.detach().cpu().contiguous().numpy().tobytes()).hexdigest(),
    }


def one_ulp(t: torch.Tensor, seed: int) -> torch.Tensor:
    """``t`` with every nonzero element moved to a neighbouring float, up or down at random (seeded). Exact zeros
    stay: another CPU's rounding never makes a value out of an exact zero (a zero-initialised bias, a dead
    channel), and a zero nudged to +-5e-324 would pick a side of a ReLU's kink that no rounding picks."""
    up = torch.rand(t.shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    inf = torch.full_like(t, float("inf"))
    moved = torch.where(up.to(t.device), torch.nextafter(t, inf), torch.nextafter(t, -inf))
    return torch.where(t == 0, t, moved)


def perturbed(flat: FlatParams, closure, var: Variation):
    """Apply ``var``'s start nudge to ``flat`` now; return the closure with its gradient noise (if any)."""
    if var.nudge is not None:
        with torch.no_grad():
            flat.params.copy_(one_ulp(flat.params, var.nudge))
    if var.noise is None:
        return closure
    calls = [0]

    def noisy(stage):
        out = closure(stage)
        calls[0] += 1
        with torch.no_grad():
            flat.grads.copy_(one_ulp(flat.grads, var.noise * 100_003 + calls[0]))
        return out

    return noisy


# -- library-level runs in float64 -------------------------------------------------------------------------
def _stepper_run(
    var: Variation,
    steps=12,
    seed=0,
    fresh=True,
    engine="autograd",
    loss="ns",
    reg_method="double_backward",
    schedule=None,
    h=0.1,
    reg=0.0,
    **opts,
):
    D, G = mog_pair(8, 12, seed=seed, dtype=torch.float64)
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    hs = [x * var.h for x in h] if isinstance(h, list) else h * var.h
    st = ODEStepper(flat, h=hs, reg=reg * var.reg, **opts)
    sched = LambdaLR(st, schedule) if schedule else None
    gen = torch.Generator().manual_seed(seed + 7)
    batch = {}

    def closure(stage):
        if stage.index == 0 or fresh:
            batch["x"] = torch.randn(32, 2, generator=gen, dtype=torch.float64)
            batch["z"] = torch.randn(32, 8, generator=gen, dtype=torch.float64)
        return game_gradients(
            D,
            G,
            Batch(batch["x"], batch["z"]),
            loss,
            stage.players,
            stage.penalties,
            reg_method=reg_method,
            engine=engine,
        )

    closure = perturbed(flat, closure, var)
    for _ in range(steps):
        st.step(closure)
        if sched:
            sched.step()
    return flat.params


CASES = {
    "rk4_joint_first_stage_fresh": lambda v: _stepper_run(v, method="rk4", h=0.1, reg=0.07),
    "rk4_decoupled_after_step_shared": lambda v: _stepper_run(
        v, method="rk4", h=0.1, reg=0.07, reg_at="after_step", coupling="decoupled", fresh=False
    ),
    "rk4_decoupled_after_step_shared_mlp": lambda v: _stepper_run(
        v, method="rk4", h=0.1, reg=0.07, reg_at="after_step", coupling="decoupled", fresh=False, engine="mlp"
    ),
    "heun_hinge_two_h_cifar_schedule": lambda v: _stepper_run(
        v, method="heun", h=[0.05, 0.08], reg=0.02, loss="hinge", schedule=cifar_schedule
    ),
    "euler_wasserstein_decoupled": lambda v: _stepper_run(
        v, method="euler", h=0.05, reg=0.0, loss="wasserstein", coupling="decoupled"
    ),
    "rk3_minimax_jvp_after_step": lambda v: _stepper_run(
        v, method="rk3", h=0.05, reg=0.1, loss="minimax", reg_at="after_step", reg_method="jvp"
    ),
    "rk4_fd_first_stage": lambda v: _stepper_run(
        v, method="rk4", h=0.05, reg=0.05, steps=6, reg_method="finite_difference"
    ),
}


# -- trainer runs (float32, the trainer's dtype) ------------------------------------------------------------
def _varied(cfg_of, var: Variation, **opts):
    """The run's Config with ``var``'s step size and lambda multipliers applied to the options it reads."""
    base = cfg_of(**opts)
    if var.h != 1.0:
        key = "h" if base.optimizer == "ode" else "lr"
        opts[key] = getattr(base, key) * var.h
    if var.reg != 1.0:
        opts["reg"] = base.reg * var.reg
    return cfg_of(**opts)


def _trained(cfg, var: Variation) -> Trainer:
    tr = Trainer(cfg)
    tr.closure = perturbed(tr.flat, tr.closure, var)
    tr.run()
    return tr


def _trainer_run(preset, tmp, var: Variation, **overrides) -> torch.Tensor:
    opts = dict(
        out=str(tmp / preset),
        progress=False,
        log_every=5,
        eval_every=10,
        plot_every=10**9,
        eval_samples=64,
        **overrides,
    )
    tr = _trained(_varied(lambda **o: make_config(preset, **o), var, **opts), var)
    rows = [json.loads(x) for x in (tmp / preset / "metrics.jsonl").read_text().splitlines()]
    losses = torch.tensor([r[k] for r in rows for k in ("loss_d", "loss_g", "g_reg") if k in r], dtype=torch.float64)
    return torch.cat([tr.flat.params.detach().double(), losses]).to(tr.flat.dtype)


def _image_run(tmp, var: Variation, preset, **overrides):
    from test_trainer import tiny_image_config

    return _trained(_varied(lambda **o: tiny_image_config(tmp, preset, **o), var, **overrides), var).flat.params


TRAINER_CASES = {
    "trainer_mog_mlp_engine": lambda tmp, v, **o: _trainer_run("mog", tmp, v, steps=30, **o),
    "trainer_mog_autograd": lambda tmp, v, **o: _trainer_run("mog", tmp, v, steps=20, grads="autograd", **o),
    "trainer_mog_joint": lambda tmp, v, **o: _trainer_run("mog-joint", tmp, v, steps=15, **o),
    "trainer_mog_adam_reg": lambda tmp, v, **o: _trainer_run("mog-adam", tmp, v, steps=20, reg=0.07, **o),
    "trainer_mog_adam_reg_autograd": lambda tmp, v, **o: _trainer_run(
        "mog-adam", tmp, v, steps=20, reg=0.07, grads="autograd", **o
    ),
    "trainer_mog_sgd_jvp": lambda tmp, v, **o: _trainer_run(
        "mog-adam", tmp, v, steps=10, optimizer="sgd", lr=0.05, reg=0.07, reg_method="jvp", grads="autograd", **o
    ),
    "trainer_dirac": lambda tmp, v, **o: _trainer_run("dirac", tmp, v, steps=40, **o),
    "trainer_cifar10_dcgan": lambda tmp, v, **o: _image_run(tmp, v, "cifar10", steps=2, batch=4, **o),
    "trainer_imagenet_conditional": lambda tmp, v, **o: _image_run(
        tmp, v, "imagenet128", steps=2, batch=4, width=2, image_size=32, eval_samples=6, **o
    ),
}
# Each trainer case has a float64 twin: the same paths with a rounding noise far below any change worth catching
# (float32 cases report bit-exactness here, and catch only coarse changes elsewhere: see MARGIN).
TRAINER_CASES.update(
    {f"{k}_f64": (lambda f: lambda tmp, v: f(tmp, v, dtype="float64"))(f) for k, f in list(TRAINER_CASES.items())}
)


def _write_cifar10(root: Path) -> None:
    __import__("test_trainer").write_cifar10(root)


def _write_noisy_imagefolder(root: Path, classes: int = 3, per_class: int = 6) -> None:
    """An ImageFolder tree of random-pixel PNGs. (Flat-colour images, with zero-initialised biases, put exact
    zeros at ReLU kinks, where a one-ulp nudge flips the activation: a float64 run then moved 4e-6 for one ulp.)"""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"n{c:08d}" / f"{i}.png")


IMAGE_CASES = {
    f"trainer_{k}{suffix}": writer
    for k, writer in (("cifar10_dcgan", _write_cifar10), ("imagenet_conditional", _write_noisy_imagefolder))
    for suffix in ("", "_f64")
}
ALL = list(CASES) + list(TRAINER_CASES)


def run_case(name: str, tmp: Path, var: Variation = SAME) -> torch.Tensor:
    torch.manual_seed(0)
    tmp.mkdir(parents=True, exist_ok=True)
    if name in CASES:
        return CASES[name](var)
    run = tmp / f"run-{abs(hash(var))}"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    run.mkdir()
    if name in IMAGE_CASES:  # the data set, written once per case (in the real on-disk format)
        if not (tmp / "data").exists():
            IMAGE_CASES[name](tmp / "data")
        (run / "data").symlink_to(tmp / "data")
    return TRAINER_CASES[name](run, var)


def scale(values: list[float]) -> float:
    """The fingerprint's size, which distances are measured against: the parameters' L2 norm (at least 1)."""
    return max(1.0, abs(values[1]) ** 0.5)


def distance(a: list[float], b: list[float]) -> float:
    """How far fingerprint ``a`` is from ``b``, relative to ``b``'s scale (the sum of squares by its square)."""
    s = scale(b)
    return max(abs(x - y) / (s * s if i == 1 else s) for i, (x, y) in enumerate(zip(a, b)))


def tolerance(want: dict) -> float:
    """MARGIN sensitivities, and never below 64 ulps of the dtype (a case that hardly moves)."""
    floor = 64 * torch.finfo(getattr(torch, want["dtype"])).eps
    return max(MARGIN[want["dtype"]] * want["sensitivity"], floor)


def compare(name: str, got: dict, want: dict) -> float:
    """The distance in tolerances (<= 1 passes); AssertionError when it fails."""
    assert got["numel"] == want["numel"], f"{name}: {got['numel']} parameters, recorded {want['numel']}"
    d, tol = distance(got["values"], want["values"]), tolerance(want)
    assert d <= tol, (
        f"{name}: the fingerprint moved {d:.3g} (relative) from the recorded one; the tolerance is {tol:.3g} "
        f"({MARGIN[want['dtype']]} x the case's measured one-ulp sensitivity {want['sensitivity']:.3g}): "
        f"got {got['values']}, recorded {want['values']}"
    )
    return d / tol


def recorded() -> dict:
    return json.loads(RECORD.read_text())


def measure(name: str, tmp: Path) -> dict:
    """The case's fingerprint and its sensitivity: the largest distance a one-ulp nudge of the start point, or
    one-ulp noise on every gradient evaluation, moved it (NUDGES patterns each)."""
    base = fingerprint(run_case(name, tmp))
    varied = [Variation(nudge=k) for k in range(NUDGES)] + [Variation(noise=k) for k in range(NUDGES)]
    base["sensitivity"] = max(distance(fingerprint(run_case(name, tmp, v))["values"], base["values"]) for v in varied)
    return base


@pytest.fixture(scope="module")
def want():
    return recorded()


def _needs(name):
    if name in IMAGE_CASES:
        pytest.importorskip("torchvision", reason="image data needs torchvision (installed by the [dev] extra)")


@pytest.mark.parametrize("name", ALL)
def test_trajectory_matches_the_recorded_one(name, tmp_path, want):
    _needs(name)
    compare(name, fingerprint(run_case(name, tmp_path)), want[name])


@pytest.mark.parametrize("name", ALL)
def test_a_one_ulp_nudge_passes_and_a_change_of_h_or_lambda_is_caught(name, tmp_path, want):
    """The tolerance is loose enough for another CPU's rounding (a start point nudged by one ulp, in a pattern the
    recording did not measure, passes) and tight enough to see a real change (h, and lambda where the case has
    one, changed by 1e-6 relative, fails)."""
    _needs(name)
    compare(name, fingerprint(run_case(name, tmp_path, Variation(nudge=1000))), want[name])
    dtype = want[name]["dtype"]
    c = CHANGE[dtype]
    changes = [Variation(h=1 + c)]
    if name != "euler_wasserstein_decoupled" and dtype == "float64":  # the cases with a regulariser
        changes.append(Variation(reg=1 + c))
    for var in changes:
        got = fingerprint(run_case(name, tmp_path, var))
        with pytest.raises(AssertionError, match="moved"):
            compare(name, got, want[name])


def test_the_guard_holds_with_other_cpu_kernels(tmp_path):
    """Every case passes where torch's CPU kernels take their portable (non-vectorised) code and MKL its
    compatible path: the rounding another CPU gives. (Here, without them, the float32-built start points of 0.2's
    cases moved 3e-7 and failed, as they did on an Intel machine.)"""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
    names = [n for n in ALL if n not in IMAGE_CASES or _has_torchvision()]
    proc = subprocess.run(
        [sys.executable, __file__, "--check", "--quiet", *names],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("within tolerance") == len(names), proc.stdout


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def main(argv: list[str]) -> int:
    import tempfile

    flags = {a for a in argv if a.startswith("--")}
    names = [a for a in argv if not a.startswith("--")] or ALL
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "--record" in flags:
            results = {}
            for name in names:
                results[name] = measure(name, tmp / name)
                print(f"{name:40s} sensitivity {results[name]['sensitivity']:.3g}", flush=True)
            old = recorded() if RECORD.exists() else {}
            RECORD.parent.mkdir(exist_ok=True)
            RECORD.write_text(json.dumps({**old, **results}, indent=1) + "\n")
            print(f"recorded {len(results)} trajectories in {RECORD}")
            return 0
        want, failed = recorded(), 0
        for name in names:
            runs = {"as recorded": SAME}
            if "--margins" in flags:
                c = CHANGE[want[name]["dtype"]]
                runs.update({"nudged": Variation(nudge=1000), f"h+{c:g}": Variation(h=1 + c)})
                if name != "euler_wasserstein_decoupled":
                    runs[f"reg+{c:g}"] = Variation(reg=1 + c)
            for what, var in runs.items():
                got = fingerprint(run_case(name, tmp / name, var))
                d = distance(got["values"], want[name]["values"]) / tolerance(want[name])
                if var is SAME:
                    same = got["sha256"] == want[name]["sha256"]
                    ok = "within tolerance" if d <= 1 else "DIFFERS"
                    failed += d > 1
                    print(f"{name:40s} {'bit-identical' if same else 'hash differs'}; {ok} ({d:.3g} tolerances)")
                else:
                    print(f"{name:40s}   {what}: {d:.3g} tolerances")
    return 1 if failed else 0


if __name__ == "__main__":
    if "--quiet" in sys.argv:
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):
            sys.exit(main(sys.argv[1:]))
    sys.exit(main(sys.argv[1:]))
