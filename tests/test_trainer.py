"""The trainer: resume exactness, atomic checkpoints, NaN handling, the CLI, image data on disk."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from odegan_kernels import cli
from odegan_kernels.train import Config, NonFiniteError, Trainer, atomic_save, make_config, read_checkpoint

FAST = dict(eval_every=10, log_every=5, plot_every=10, ckpt_every=10, eval_samples=256, progress=False)


def test_resume_equals_uninterrupted(tmp_path):
    a = Trainer(make_config("mog", steps=20, out=str(tmp_path / "a"), **FAST))
    a.run()
    b = Trainer(make_config("mog", steps=10, out=str(tmp_path / "b"), **FAST))
    b.run()
    c = Trainer(make_config("mog", steps=20, out=str(tmp_path / "b"), **FAST))  # resumes at step 10
    c.run()
    assert c.step == 20
    assert torch.equal(a.flat.params, c.flat.params)
    assert a.opt.steps == c.opt.steps == 20


@pytest.mark.parametrize("preset", ["mog-joint", "mog-adam"])
def test_resume_other_optimisers(tmp_path, preset):
    a = Trainer(make_config(preset, steps=12, out=str(tmp_path / "a"), **FAST))
    a.run()
    Trainer(make_config(preset, steps=6, out=str(tmp_path / "b"), **FAST)).run()
    c = Trainer(make_config(preset, steps=12, out=str(tmp_path / "b"), **FAST))
    c.run()
    assert torch.equal(a.flat.params, c.flat.params)


def test_resume_refuses_a_different_run(tmp_path):
    Trainer(make_config("mog", steps=10, out=str(tmp_path), **FAST)).run()
    with pytest.raises(ValueError, match="checkpoint was trained with method='rk4'"):
        Trainer(make_config("mog", steps=20, method="heun", out=str(tmp_path), **FAST)).run()


def test_atomic_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"v": 1}, path)

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_nan_stops_with_a_clear_error(tmp_path):
    cfg = make_config("mog", steps=40, out=str(tmp_path), **FAST)
    tr = Trainer(cfg)
    sample = tr.problem.real_batch

    def corrupt_after_step_12(n, gen):  # a corrupt batch arrives mid-run
        x = sample(n, gen)
        return x * float("nan") if tr.step >= 12 else x

    tr.problem.real_batch = corrupt_after_step_12
    with pytest.raises(NonFiniteError, match=r"non-finite loss_d.* by step 15 \(3 rollbacks allowed\)"):
        tr.run()
    # each rollback is recorded, with the step size halved each time; then the run stops
    events = [r for r in tr.metrics.rows() if r.get("event") == "diverged"]
    assert [(e["step"], e["rolled_back_to"], e["retries_left"]) for e in events] == [
        (15, 10, 2),
        (15, 10, 1),
        (15, 10, 0),
    ]
    assert [e["h"][0] for e in events] == pytest.approx([0.05, 0.025, 0.0125])
    # the last good checkpoint (step 10) is intact and resumable
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["run"]["step"] == 10 and all(torch.isfinite(v).all() for v in state["D"].values())


def test_bad_options():
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("mnist")
    with pytest.raises(ValueError, match=r"unknown option.*did you mean steps for stepz\?"):
        make_config("mog", stepz=3)  # a config file's misspelt key: the nearest option named
    with pytest.raises(ValueError, match="data_per_stage"):
        make_config("mog", data_per_stage="sometimes")
    with pytest.raises(ValueError, match="needs --data"):
        Trainer(make_config("cifar10", device="cpu", out="unused"))


def test_a_float64_run_holds_everything_in_float64(tmp_path):
    """dtype=float64: players made in it (not cast from float32), data, latents and the flat buffers in it."""
    cfg = make_config("mog", steps=3, out=str(tmp_path / "r"), progress=False, dtype="float64", eval_samples=64)
    tr = Trainer(cfg)
    x, _ = tr.problem.draw(8, torch.Generator().manual_seed(0))
    assert tr.flat.dtype == x.dtype == tr.fixed_z.dtype == torch.float64
    from odegan_kernels.models import mog_pair

    D64, _ = mog_pair(cfg.z_dim, cfg.hidden, seed=cfg.seed, dtype=torch.float64)
    D32, _ = mog_pair(cfg.z_dim, cfg.hidden, seed=cfg.seed)
    first = next(tr.D.parameters()).detach()
    assert torch.equal(first, next(D64.parameters()).detach())  # initialised in float64 ...
    assert not torch.equal(first, next(D32.parameters()).detach().double())  # ... not a float32 pair cast
    assert tr.run()["step"] == 3
    with pytest.raises(ValueError, match="dtype must be one of"):
        make_config("mog", dtype="float16")
    with pytest.raises(ValueError, match="autocast .* needs dtype float32"):
        make_config("mog", dtype="float64", autocast=True)


def test_cli_main_job_end_to_end(tmp_path):
    """The README's main command with a tiny step count, as a user runs it."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "odegan_kernels",
        "train",
        "mog",
        "--steps",
        "30",
        "--out",
        str(out),
        "--set",
        "eval_every=15",
        "--set",
        "plot_every=15",
        "--set",
        "eval_samples=512",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["step"] == 30 and summary["steps_per_s"] > 0
    for name in (
        "config.json",
        "metrics.jsonl",
        "checkpoint.pt",
        "summary.json",
        "metrics.png",
        "samples_0000015.png",
        "samples_0000030.png",
    ):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "modes" in r] == [0, 15, 30]
    assert json.loads((out / "config.json").read_text())["coupling"] == "decoupled"


def test_cli_errors_and_dry_run(capsys):
    assert cli.main(["train", "mog", "--set", "nope=1"]) == 2
    assert "unknown option 'nope'" in capsys.readouterr().err
    assert cli.main(["train", "mog", "--dry-run", "--set", "coupling=joint"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert 'coupling = "joint"  # joint (one RK step of both players) | decoupled (each with the other frozen)' in lines
    assert len(lines) == len(Config.help()) and all("  # " in line for line in lines)  # every option, explained
    assert cli.main(["backends"]) == 0
    assert "foreach" in capsys.readouterr().out


def write_cifar10(root, n=128):
    """A tiny CIFAR-10 in the real on-disk format (pickled batches in cifar-10-batches-py)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def tiny_image_config(tmp_path, preset, **overrides):
    """An image preset on the data written to tmp_path/data: CPU, no loader workers, fast logging."""
    opts = {
        **FAST,
        "eval_samples": 16,
        "data": str(tmp_path / "data"),
        "device": "cpu",
        "workers": 0,
        "out": str(tmp_path / "run"),
        "threads": 2,
        **overrides,
    }
    return make_config(preset, **opts)


def tiny_cifar10_config(tmp_path, **overrides):
    """The cifar10 preset on write_cifar10's data, batch 8."""
    return tiny_image_config(tmp_path, "cifar10", **{"batch": 8, **overrides})


def run_interrupted(tr, step, stage_index=2):
    """Run tr with a Ctrl-C raised inside stage ``stage_index`` of step ``step``."""
    inner = tr.closure

    def interrupt(stage):
        if tr.step == step and stage.index == stage_index:
            raise KeyboardInterrupt
        return inner(stage)

    tr.closure = interrupt
    with pytest.raises(KeyboardInterrupt):
        tr.run()


def test_cifar10_training_from_local_files(tmp_path):
    pytest.importorskip("torchvision", reason="image data needs torchvision (installed by the [dev] extra)")
    write_cifar10(tmp_path / "data")
    cfg = tiny_cifar10_config(tmp_path, steps=2)
    tr = Trainer(cfg)
    x = tr.problem.real_batch(8, tr.state.streams.data)
    assert x.shape == (8, 3, 32, 32) == (8, *tr.problem.sample_shape) and x.min() >= -1 and x.max() <= 1
    summary = tr.run()
    assert summary["step"] == 2 and (tmp_path / "run" / "samples_0000002.png").is_file()


def test_image_resume_equals_uninterrupted(tmp_path):
    """Image runs resume mid-epoch exactly: the checkpoint records the batches drawn in the current epoch
    (the loader skips them), including after Ctrl-C, whose half-done step gives its batches back. 130
    images in batches of 8 with a fresh batch per RK4 stage: an epoch is 16 batches, 4 steps."""
    pytest.importorskip("torchvision", reason="image data needs torchvision (installed by the [dev] extra)")
    write_cifar10(tmp_path / "data", n=26)
    run = lambda name, steps, **kw: tiny_cifar10_config(tmp_path, steps=steps, out=str(tmp_path / name), **kw)
    a = Trainer(run("a", 7))
    a.run()
    Trainer(run("b", 3)).run()  # stops in the middle of the first epoch
    b = Trainer(run("b", 7, workers=2))  # loader workers prefetch: only the batches used count
    b.run()
    assert b.problem.epoch == 1 and b.problem.batches == 12
    run_interrupted(Trainer(run("c", 7, ckpt_every=1000)), 5)
    assert torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)["run"]["data"] == {"epoch": 1, "batches": 4}
    c = Trainer(run("c", 7))
    c.run()
    assert torch.equal(a.flat.params, b.flat.params) and torch.equal(a.flat.params, c.flat.params)
    for k, v in a.G.state_dict().items():  # BatchNorm's statistics too: the undone step's updates are undone
        assert torch.equal(v, c.G.state_dict()[k]), k


def test_missing_data_is_a_clear_error(tmp_path):
    pytest.importorskip("torchvision", reason="image data needs torchvision (installed by the [dev] extra)")
    from odegan_kernels.data import image_loader

    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_loader(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no cifar-10-batches-py"):
        image_loader(str(tmp_path))


def test_fid_evaluation_hands_torch_fidelity_real_samples(tmp_path, monkeypatch):
    """Image evaluation passes uint8 NCHW samples and the local Inception weights to torch-fidelity.

    Its Inception weights cannot be downloaded here, so torch-fidelity's entry point is replaced by one
    that checks and records what it receives: this tests our side of the call, not the Inception net.
    """
    torch_fidelity = pytest.importorskip("torch_fidelity", reason="FID needs torch-fidelity (the [dev] extra)")
    write_cifar10(tmp_path / "data")
    seen = {}

    def calculate_metrics(input1, input2, **kw):
        xs = torch.stack([input1[i] for i in range(len(input1))])
        seen.update(
            n=len(input1),
            dtype=xs.dtype,
            shape=tuple(xs.shape[1:]),
            lo=int(xs.min()),
            hi=int(xs.max()),
            real=input2,
            weights=torch.load(kw["feature_extractor_weights_path"], weights_only=True),
            **kw,
        )
        return {"frechet_inception_distance": 12.5, "inception_score_mean": 3.25}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", calculate_metrics)
    write_imagefolder(tmp_path / "real")
    weights = {"Conv2d_1a_3x3.conv.weight": torch.randn(32, 3, 3, 3), "fc.weight": torch.randn(1008, 2048)}
    torch.save(weights, tmp_path / "weights.pth")
    cfg = tiny_cifar10_config(
        tmp_path,
        steps=1,
        fid_real=str(tmp_path / "real"),
        fid_samples=37,
        inception_weights=str(tmp_path / "weights.pth"),
    )
    result = Trainer(cfg).evaluate()
    assert result["fid"] == 12.5 and result["is"] == 3.25
    assert seen["n"] == 37 and seen["dtype"] == torch.uint8 and seen["shape"] == (3, 32, 32)
    assert 0 <= seen["lo"] < seen["hi"] <= 255
    assert seen["real"] == str(tmp_path / "real") and seen["samples_find_deep"] and seen["fid"] and seen["isc"]
    got = seen["weights"]
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path):
    cfg = make_config("mog", steps=40, out=str(tmp_path), **{**FAST, "ckpt_every": 1000})
    run_interrupted(Trainer(cfg), 13)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["run"]["step"] == 13
    # resuming from it reaches the same parameters as a run that was never interrupted
    Trainer(make_config("mog", steps=40, out=str(tmp_path), **FAST)).run()
    a = Trainer(make_config("mog", steps=40, out=str(tmp_path / "ref"), **FAST))
    a.run()
    b = Trainer(make_config("mog", steps=40, out=str(tmp_path), **FAST))
    b.load_state_dict(read_checkpoint(tmp_path / "checkpoint.pt"))
    assert b.step == 40 and torch.equal(a.flat.params, b.flat.params)


def test_checkpoint_refuses_non_finite_parameters(tmp_path):
    tr = Trainer(make_config("mog", steps=10, out=str(tmp_path), **FAST))
    tr.run()
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    tr.flat.params[3] = float("nan")
    with pytest.raises(NonFiniteError, match="kept the last good checkpoint"):
        tr.save_checkpoint()
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert kept["run"]["step"] == good["run"]["step"]
    assert all(torch.equal(kept["D"][k], good["D"][k]) for k in good["D"])


def test_rerun_of_a_finished_run_reports_its_metrics(tmp_path):
    first = Trainer(make_config("mog", steps=10, out=str(tmp_path), **FAST)).run()
    summary = Trainer(make_config("mog", steps=10, out=str(tmp_path), **FAST)).run()
    assert summary["step"] == 10 and "modes" in summary
    # nothing ran this time: the run's own speed (its last logged interval), never 0
    last = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "steps_per_s" in x][-1]
    assert summary["steps_per_s"] == last["steps_per_s"] > 0 and first["steps_per_s"] > 0


@pytest.mark.parametrize(
    "opts",
    [
        {"reg_method": "finite_difference"},
        {"reg_method": "jvp"},
        {"autocast": True},
        {"loss": "hinge"},
        {"loss": "wasserstein"},
    ],
)
def test_trainer_options_run(tmp_path, opts):
    summary = Trainer(make_config("mog", steps=10, out=str(tmp_path), **FAST, **opts)).run()
    assert summary["finite"] and summary["step"] == 10


def test_bad_reg_method_and_loss():
    with pytest.raises(ValueError, match="reg_method must be one of"):
        make_config("mog", reg_method="guess")
    with pytest.raises(ValueError, match="loss must be one of"):
        make_config("mog", loss="l2")


def test_cifar10_resnet_preset_trains(tmp_path):
    pytest.importorskip("torchvision", reason="image data needs torchvision (installed by the [dev] extra)")
    write_cifar10(tmp_path / "data")
    cfg = tiny_cifar10_config(tmp_path, steps=1)
    cfg.arch = "resnet"
    tr = Trainer(cfg)
    assert type(tr.D).__name__ == "ResNetDiscriminator"
    assert tr.run()["step"] == 1 and torch.isfinite(tr.flat.params).all()
    assert make_config("cifar10-resnet").arch == "resnet"


def write_imagefolder(root, classes=3, per_class=6, size=(40, 48)):
    """A tiny ImageNet-style tree (root/<class>/<image>.png); each class's images are one flat colour,
    so a batch's labels can be checked against its pixels."""
    from PIL import Image

    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True)
        for i in range(per_class):
            rgb = tuple(int(v) for v in np.eye(3, dtype=np.uint8)[c % 3] * 255)
            Image.new("RGB", size, rgb).save(root / f"n{c:08d}" / f"img_{i}.png")


def tiny_imagenet_config(tmp_path, **overrides):
    """The imagenet128 preset on write_imagefolder's data: width 2, 32x32, batch 4."""
    opts = {"eval_samples": 6, "batch": 4, "width": 2, "image_size": 32, **overrides}
    return tiny_image_config(tmp_path, "imagenet128", **opts)


@pytest.mark.parametrize("size", [32, 64])
def test_conditional_imagefolder_training(tmp_path, size):
    """The imagenet128 preset on a local ImageFolder: the labels of each real batch are its images' classes,
    the fake labels are drawn per stage, evaluation samples cycle through the classes."""
    pytest.importorskip("torchvision", reason="image data needs torchvision (installed by the [dev] extra)")
    write_imagefolder(tmp_path / "data")
    tr = Trainer(tiny_imagenet_config(tmp_path, steps=2, image_size=size))
    assert tr.problem.num_classes == 3 and tr.problem.sample_shape == (3, size, size)
    assert type(tr.G).__name__ == "ConditionalResNetGenerator"
    for _ in range(3):
        x, y = tr.problem.draw(4, tr.state.streams.data)
        assert x.shape == (4, 3, size, size) and y.dtype == torch.long
        colour = x.mean(dim=(2, 3)).argmax(1)  # class c is the pure colour c (red, green, blue)
        assert torch.equal(colour, y % 3)
    assert torch.equal(tr.fixed_y, torch.tensor([0, 1, 2, 0, 1, 2]))
    seen = []
    real_closure = tr.closure

    def spy(stage):
        out = real_closure(stage)
        seen.append((tr.game_closure.batch.y_real.clone(), tr.game_closure.batch.y_fake.clone()))
        return out

    tr.closure = spy
    summary = tr.run()
    assert summary["step"] == 2 and torch.isfinite(tr.flat.params).all()
    assert len(seen) == 8  # joint RK4 with a fresh batch per stage: 4 stages a step
    assert all(yr.shape == yf.shape == (4,) and 0 <= yf.min() and yf.max() < 3 for yr, yf in seen)
    assert len({tuple(yf.tolist()) for _, yf in seen}) > 1  # fresh fake labels per stage
    assert tr.samples().shape == (6, 3, size, size)
    assert (tmp_path / "run" / "samples_0000002.png").is_file()
    # a different width is a different model: resuming refuses it with a clear message
    with pytest.raises(ValueError, match="checkpoint was trained with width=2"):
        Trainer(tiny_imagenet_config(tmp_path, steps=3, width=4, image_size=size)).run()


def test_image_options_are_checked(tmp_path):
    pytest.importorskip("torchvision", reason="image data needs torchvision (installed by the [dev] extra)")
    write_imagefolder(tmp_path / "data")
    with pytest.raises(ValueError, match="needs arch='resnet128' or 'dcgan'"):
        Trainer(tiny_imagenet_config(tmp_path, arch="resnet", width=None, image_size=64))
    with pytest.raises(ValueError, match="arch 'dcgan' makes power-of-two sizes >= 8"):
        Trainer(tiny_imagenet_config(tmp_path, arch="dcgan", width=2, image_size=48))
    with pytest.raises(ValueError, match="width sets the dcgan and resnet128 pairs"):
        Trainer(tiny_imagenet_config(tmp_path, arch="resnet"))
    with pytest.raises(ValueError, match="power-of-two sizes >= 32"):
        Trainer(tiny_imagenet_config(tmp_path, image_size=48))
    with pytest.raises(ValueError, match=r"arch must be one of \('dcgan', 'resnet', 'resnet128'\), got 'vit'"):
        Trainer(tiny_imagenet_config(tmp_path, arch="vit"))
    write_cifar10(tmp_path / "cifar")
    with pytest.raises(ValueError, match="CIFAR-10 images are 32x32"):
        Trainer(tiny_cifar10_config(tmp_path, data=str(tmp_path / "cifar"), arch="resnet128", image_size=64))
    # refused when the options are read (the command line's exit status 2), before any data or model is built
    for bad in (dict(channels=2), dict(arch="resnet", width=8), dict(arch="resnet128", image_size=48)):
        with pytest.raises(ValueError, match="channels must be 1|width sets|power-of-two sizes >= 32"):
            make_config("imagefolder", data=str(tmp_path / "data"), **bad)
    cfg = make_config("imagenet128")
    assert (cfg.arch, cfg.image_size, cfg.width, cfg.schedule, cfg.coupling) == (
        "resnet128",
        128,
        None,
        "cifar",
        "joint",
    )


def test_tensorboard_and_console_ticks(tmp_path, capsys):
    """TensorBoard events beside metrics.jsonl (scalars and sample pictures); without a progress bar (or when
    piped) one plain line per log interval, nothing interleaved."""
    pytest.importorskip("tensorboard", reason="tensorboard is in the [dev] extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(make_config("mog", steps=20, out=str(tmp_path), **FAST)).run()
    lines = capsys.readouterr().out.splitlines()
    ticks = [line for line in lines if line.startswith("step ") and "steps/s" in line]
    assert [t.split()[1] for t in ticks] == ["5/20", "10/20", "15/20", "20/20"]
    assert all("loss_d=" in t and "\r" not in t for t in ticks)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss_d", "train/loss_g", "train/g_reg", "eval/modes"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss_d")] == [5, 10, 15, 20]
    loss_rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss_d" in x]
    assert [e.value for e in events.Scalars("train/loss_d")] == pytest.approx([r["loss_d"] for r in loss_rows])
    assert "samples" in tags["images"]
    off = make_config("mog", steps=5, out=str(tmp_path / "off"), tensorboard=False, **FAST)
    Trainer(off).run()
    assert not (tmp_path / "off" / "tensorboard").exists()


def test_small_grayscale_dcgan(tmp_path):
    """The reference DCGAN made narrow for quick trials, on 1-channel images."""
    pytest.importorskip("torchvision", reason="image data needs torchvision (installed by the [dev] extra)")
    write_imagefolder(tmp_path / "data", size=(32, 32))
    cfg = tiny_image_config(tmp_path, "imagefolder", steps=2, batch=4, width=8, channels=1, eval_samples=8)
    tr = Trainer(cfg)
    assert tr.problem.sample_shape == (1, 32, 32)
    assert tr.G(torch.randn(2, 128)).shape == (2, 1, 32, 32)
    assert tr.flat.numel < 250_000  # width 64: 6.7 million
    assert tr.run()["step"] == 2 and torch.isfinite(tr.flat.params).all()
    with pytest.raises(ValueError, match="channels=1 .* needs arch='dcgan'"):
        Trainer(tiny_image_config(tmp_path, "imagefolder", arch="resnet", channels=1))
    with pytest.raises(ValueError, match="channels must be"):
        make_config("cifar10", channels=0)


def test_dirac_draws_its_trajectory(tmp_path):
    summary = Trainer(make_config("dirac", steps=100, out=str(tmp_path), progress=False)).run()
    assert summary["radius"] < 1.0  # RK4 with the regulariser heads for the equilibrium
    assert (tmp_path / "trajectory.png").stat().st_size > 1000 and (tmp_path / "metrics.png").exists()
    points = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in points if "psi" in r]) == 11  # step 0 and every 10 steps: the picture's points


def test_cli_refuses_what_this_machine_cannot_run(tmp_path, capsys):
    """An unavailable backend or device, or graph capture off a GPU: one line, exit 2, nothing written."""
    out = tmp_path / "run"
    cases = [(["--set", "cuda_graph=true"], "cuda_graph=True needs a CUDA device")]
    if not torch.cuda.is_available():
        cases += [(["--device", "cuda"], "torch sees no CUDA device")]  # (tests run Triton through its interpreter)
    for args, msg in cases:
        assert cli.main(["train", "mog", "--steps", "5", "--out", str(out), *args]) == 2, args
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()
    assert cli.main(["train", "mog", "--set", "coupling_=joint"]) == 2
    assert "did you mean coupling?" in capsys.readouterr().err


def test_fresh_sets_the_earlier_run_aside(tmp_path, capsys):
    Trainer(make_config("mog", steps=20, out=str(tmp_path), **FAST)).run()
    before = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    Trainer(make_config("mog", steps=10, out=str(tmp_path), **FAST)).run(resume=False)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == before
    assert "moved to" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.prev.pt").exists()  # only the new run's checkpoints remain
    assert read_rows(tmp_path)[-1]["step"] == 10 and not (tmp_path / "samples_0000020.png").exists()


def read_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_without_a_checkpoint_is_set_aside_not_overwritten(tmp_path, capsys):
    """A folder whose run ended before its first checkpoint (diverged, killed early): the next run keeps the
    earlier files (config.json, metrics.jsonl) in replaced-<time>/ rather than writing over them."""
    Trainer(make_config("mog", steps=20, out=str(tmp_path), **FAST)).run()
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (tmp_path / name).unlink(missing_ok=True)
    rows = read_rows(tmp_path)
    Trainer(make_config("mog", steps=10, seed=7, out=str(tmp_path), **FAST)).run()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("replaced-")]
    assert read_rows(aside) == rows and json.loads((aside / "config.json").read_text())["seed"] != 7
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert read_rows(tmp_path)[-1]["step"] == 10
