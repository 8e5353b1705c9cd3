"""Trajectories recorded before the restructuring (and every later move): the same runs must reach the
same parameters.

Each case runs a short training through the public API and reduces the final flat parameters to a
fingerprint (sum, sum of squares, two fixed random projections) plus a SHA-256 of their bytes. The test
compares fingerprints with a tolerance by dtype, because another CPU's BLAS may round differently; on the
machine that recorded them the hashes match too, and the test reports when they do not, which is how a
move is checked to be bit-exact (``python tests/test_trajectories.py --check`` prints both).

    python tests/test_trajectories.py --record    # rewrite tests/data/trajectories.json (only on purpose)
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

sys.path.insert(0, str(Path(__file__).resolve().parent))

from odegan_kernels import FlatParams, ODEStepper, game_gradients  # noqa: E402
from odegan_kernels.models import mog_pair
from odegan_kernels.ode import cifar_schedule  # noqa: E402
from odegan_kernels.train import Trainer, make_config  # noqa: E402

RECORD = Path(__file__).resolve().parent / "data" / "trajectories.json"
TOL = {"float64": 1e-9, "float32": 2e-4}


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


# -- library-level runs in float64 -------------------------------------------------------------------------
def _stepper_run(
    steps=12, seed=0, fresh=True, engine="autograd", loss="ns", penalty_method="double_backward", schedule=None, **opts
):
    D, G = mog_pair(8, 12, seed=seed)
    D, G = D.double(), G.double()
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    st = ODEStepper(flat, **opts)
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
            batch["x"],
            batch["z"],
            loss,
            players=stage.players,
            penalty=stage.penalty,
            penalty_method=penalty_method,
            engine=engine,
        )

    for _ in range(steps):
        st.step(closure)
        if sched:
            sched.step()
    return flat.params


CASES = {
    "rk4_joint_first_stage_fresh": lambda: _stepper_run(method="rk4", h=0.1, reg=0.07),
    "rk4_decoupled_after_step_shared": lambda: _stepper_run(
        method="rk4", h=0.1, reg=0.07, penalty_at="after_step", coupling="decoupled", fresh=False
    ),
    "rk4_decoupled_after_step_shared_mlp": lambda: _stepper_run(
        method="rk4", h=0.1, reg=0.07, penalty_at="after_step", coupling="decoupled", fresh=False, engine="mlp"
    ),
    "heun_hinge_two_h_cifar_schedule": lambda: _stepper_run(
        method="heun", h=[0.05, 0.08], reg=0.02, loss="hinge", schedule=cifar_schedule
    ),
    "euler_wasserstein_decoupled": lambda: _stepper_run(
        method="euler", h=0.05, reg=0.0, loss="wasserstein", coupling="decoupled"
    ),
    "rk3_minimax_jvp_after_step": lambda: _stepper_run(
        method="rk3", h=0.05, reg=0.1, loss="minimax", penalty_at="after_step", penalty_method="jvp"
    ),
    "rk4_fd_first_stage": lambda: _stepper_run(
        method="rk4", h=0.05, reg=0.05, steps=6, penalty_method="finite_difference"
    ),
}


# -- trainer runs (float32, the trainer's dtype) ------------------------------------------------------------
def _trainer_run(preset, tmp, **overrides) -> torch.Tensor:
    opts = dict(
        out=str(tmp / preset),
        progress=False,
        log_every=5,
        eval_every=10,
        plot_every=10**9,
        eval_samples=64,
        **overrides,
    )
    tr = Trainer(make_config(preset, **opts))
    tr.run()
    rows = [json.loads(x) for x in (tmp / preset / "metrics.jsonl").read_text().splitlines()]
    losses = torch.tensor([r[k] for r in rows for k in ("loss_d", "loss_g", "penalty") if k in r], dtype=torch.float64)
    return torch.cat([tr.flat.params.detach().double(), losses]).float()


def _image_run(tmp, preset, writer, **overrides):
    from test_trainer import tiny_image_config

    writer(tmp / "data")
    cfg = tiny_image_config(tmp, preset, **overrides)
    tr = Trainer(cfg)
    tr.run()
    return tr.flat.params


TRAINER_CASES = {
    "trainer_mog_mlp_engine": lambda tmp: _trainer_run("mog", tmp, steps=30),
    "trainer_mog_autograd": lambda tmp: _trainer_run("mog", tmp, steps=20, grads="autograd"),
    "trainer_mog_joint": lambda tmp: _trainer_run("mog-joint", tmp, steps=15),
    "trainer_mog_adam_reg": lambda tmp: _trainer_run("mog-adam", tmp, steps=20, reg=0.07),
    "trainer_mog_adam_reg_autograd": lambda tmp: _trainer_run("mog-adam", tmp, steps=20, reg=0.07, grads="autograd"),
    "trainer_mog_sgd_jvp": lambda tmp: _trainer_run(
        "mog-adam", tmp, steps=10, optimizer="sgd", lr=0.05, reg=0.07, penalty_method="jvp", grads="autograd"
    ),
    "trainer_dirac": lambda tmp: _trainer_run("dirac", tmp, steps=40),
    "trainer_cifar10_dcgan": lambda tmp: _image_run(
        tmp, "cifar10", __import__("test_trainer").write_cifar10, steps=2, batch=4
    ),
    "trainer_imagenet_conditional": lambda tmp: _image_run(
        tmp,
        "imagenet128",
        __import__("test_trainer").write_imagefolder,
        steps=2,
        batch=4,
        width=2,
        image_size=32,
        eval_samples=6,
    ),
}


def _run_case(name: str, tmp: Path) -> torch.Tensor:
    torch.manual_seed(0)
    if name in CASES:
        return CASES[name]()
    return TRAINER_CASES[name](tmp)


def _compare(name: str, got: dict, want: dict) -> None:
    assert got["numel"] == want["numel"], f"{name}: {got['numel']} parameters, recorded {want['numel']}"
    tol = TOL[want["dtype"]]
    scale = max(1.0, abs(want["values"][1]) ** 0.5)
    for what, a, b in zip(("sum", "sum of squares", "projection 1", "projection 2"), got["values"], want["values"]):
        s = scale * scale if what == "sum of squares" else scale
        assert abs(a - b) <= tol * s, f"{name}: {what} {a!r} != recorded {b!r} (tolerance {tol} x {s:.3g})"


ALL = list(CASES) + list(TRAINER_CASES)


@pytest.mark.parametrize("name", ALL)
def test_trajectory_matches_the_recorded_one(name, tmp_path):
    if name == "trainer_imagenet_conditional" or name == "trainer_cifar10_dcgan":
        pytest.importorskip("torchvision", reason="image data needs torchvision (installed by the [dev] extra)")
    want = json.loads(RECORD.read_text())[name]
    got = fingerprint(_run_case(name, tmp_path))
    _compare(name, got, want)


if __name__ == "__main__":
    import tempfile

    record = "--record" in sys.argv
    results = {}
    for name in ALL:
        with tempfile.TemporaryDirectory() as d:
            results[name] = fingerprint(_run_case(name, Path(d)))
    if record:
        RECORD.parent.mkdir(exist_ok=True)
        RECORD.write_text(json.dumps(results, indent=1) + "\n")
        print(f"recorded {len(results)} trajectories in {RECORD}")
    else:
        want = json.loads(RECORD.read_text())
        for name, got in results.items():
            same = got["sha256"] == want[name]["sha256"]
            try:
                _compare(name, got, want[name])
                ok = "within tolerance"
            except AssertionError as exc:
                ok = f"DIFFERS: {exc}"
            print(f"{name:40s} {'bit-identical' if same else 'hash differs'}; {ok}")
