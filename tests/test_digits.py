"""scikit-learn's digits and the offline image metric: the digits preset end to end, the classifier metric's
ordering of real, corrupted and collapsed samples, its determinism and cache, the extra-missing message, gray
sample grids, and fid_features=classifier on another image preset."""

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the digits need scikit-learn (the [dev] and [digits] extras)")
pytest.importorskip("torch_fidelity", reason="the classifier metric goes through torch-fidelity (the [dev] extra)")

from odegan_kernels import cli  # noqa: E402
from odegan_kernels.classifier import (  # noqa: E402
    ClassifierMetric,
    load_or_train,
    to_uint8,
    train_classifier,
)
from odegan_kernels.data import DIGITS_EXTRA, DigitsDataset, heldout_split, image_transform  # noqa: E402
from odegan_kernels.problems import plot_image_grid  # noqa: E402
from odegan_kernels.train import Trainer, make_config  # noqa: E402

from .test_trainer import FAST, tiny_image_config, write_imagefolder  # noqa: E402


def digits(split: str, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    ds = DigitsDataset(split, image_transform(1, size))
    return to_uint8(torch.stack([ds[i][0] for i in range(len(ds))])), torch.tensor(ds.targets)


@pytest.fixture(scope="module")
def metric(tmp_path_factory):
    (tx, ty), (hx, hy) = digits("train"), digits("heldout")
    return ClassifierMetric(tx, ty, hx, 10, tmp_path_factory.mktemp("classifier"), real_labels=hy)


def test_digits_splits():
    """1797 images: every fifth of each class held out (364), the rest (1433) train; disjoint, every class in
    both, values 0..255 (the package's 0..16 scaled)."""
    (tx, ty), (hx, hy) = digits("train", 8), digits("heldout", 8)
    assert (len(ty), len(hy)) == (1433, 364) and tx.shape[1:] == (1, 8, 8)
    assert set(ty.tolist()) == set(hy.tolist()) == set(range(10))
    flat = lambda x: {bytes(r) for r in x.flatten(1).numpy()}
    assert len(flat(tx) & flat(hx)) < 5  # a handful of identical 8x8 images occur twice in the data set itself
    assert heldout_split([0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0]) == ([2, 3, 4, 5, 6, 8, 9, 10], [0, 1, 7])
    # 4 classes x 25: held out are 0-3, 20-23, 40-43, 60-63, 80-83; thinned evenly to 3 and 10
    assert heldout_split(list(range(4)) * 25, max_train=10, max_heldout=3) == (
        [4, 12, 24, 32, 44, 52, 64, 72, 84, 92],
        [0, 22, 61],
    )


def test_the_metric_orders_real_corrupted_and_collapsed_samples(metric):
    """Real held-out digits against the train split score far better than blurred, shifted, one-class or noise
    samples. Measured (16x16, this recipe): real 5.2 (coverage 1, score 9.4); 3x3 box blur 121; shifted by one
    pixel 184, by two 1146; one class 2404 (coverage 0.1, score 1.08); uniform noise 2411. Asserted with a
    factor of 5 between the real value and the nearest corrupted one."""
    real = metric.real_vs_real()
    assert metric.accuracy > 0.95 and real["coverage"] == 1.0 and real["score"] > 8.5
    x = metric.train_images.float() / 127.5 - 1
    labels = digits("train")[1]
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    threes = x[labels == 3]
    corrupted = {
        "blurred": blurred,
        "shifted": torch.roll(x, 1, dims=3),
        "one class": threes[torch.arange(len(x)) % len(threes)],
        "noise": torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1,
    }
    scores = {k: metric(v) for k, v in corrupted.items()}
    for name, res in scores.items():
        assert res["fid_classifier"] > 5 * real["fid_classifier"], (name, res, real)
    assert scores["one class"]["coverage"] == 0.1 and scores["one class"]["score"] < 1.5
    assert all(res["score"] < real["score"] for res in scores.values())
    nan = metric(torch.full((4, 1, 16, 16), float("nan")))
    assert nan == {"fid_classifier": None, "coverage": None, "score": None}
    with pytest.raises(ValueError, match=r"samples must be \[N, 1, 16, 16\] images"):
        metric(torch.zeros(4, 3, 16, 16))


def test_the_classifier_is_deterministic_and_cached(tmp_path, monkeypatch):
    """The same data and recipe give the same weights bit for bit (one thread, deterministic algorithms, a
    private RNG state: the caller's RNG is untouched); a cached file is read back instead of retraining, and a
    file that holds code is never unpickled (weights_only): the classifier is retrained."""
    x, y = digits("train", 8)
    before = torch.random.get_rng_state()
    a, b = train_classifier(x, y, 10), train_classifier(x, y, 10)
    assert torch.equal(torch.random.get_rng_state(), before)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    net, path = load_or_train(x, y, 10, tmp_path)
    assert path.is_file() and path.parent == tmp_path
    import odegan_kernels.classifier as classifier

    monkeypatch.setattr(classifier, "train_classifier", lambda *a, **k: pytest.fail("retrained a cached classifier"))
    cached, again = load_or_train(x, y, 10, tmp_path)
    assert again == path and all(torch.equal(u, v) for u, v in zip(net.parameters(), cached.parameters()))
    monkeypatch.undo()
    _, other = load_or_train(x, (y + 1) % 10, 10, tmp_path)
    assert other != path  # other labels: another key, another file

    class Payload:
        def __reduce__(self):
            return (print, ("the payload ran",))

    torch.save({"arch": Payload(), "state": {}}, path)
    retrained, _ = load_or_train(x, y, 10, tmp_path)
    assert all(torch.equal(u, v) for u, v in zip(net.parameters(), retrained.parameters()))


def test_the_digits_preset_improves_the_metric(tmp_path):
    """The digits preset end to end (width 8, 200 steps at a constant h 0.04, 500 samples per evaluation):
    metrics.jsonl gets the classifier metric at every evaluation, classifier.json says what real images score,
    samples are gray, and the Frechet distance falls from initialisation. Measured over seeds 0-4: step 0 gives
    5600-6200, step 200 2360-3190, a ratio of 0.39-0.54; asserted: below 0.7."""
    opts = dict(FAST, steps=200, width=8, eval_every=200, eval_samples=500, plot_every=200, ckpt_every=200)
    cfg = make_config("digits", out=str(tmp_path), schedule="constant", **opts)
    summary = Trainer(cfg).run()
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "fid_classifier" in r]
    assert [r["step"] for r in evals] == [0, 200]
    assert evals[1]["fid_classifier"] < 0.7 * evals[0]["fid_classifier"], evals
    assert 0 <= evals[1]["coverage"] <= 1 and 1 <= evals[1]["score"] <= 10
    assert summary["fid_classifier"] == evals[1]["fid_classifier"]
    info = json.loads((tmp_path / "classifier.json").read_text())
    assert info["heldout_accuracy"] > 0.95 and info["real_vs_real"]["fid_classifier"] < 20
    assert (tmp_path / info["classifier"]).is_file()
    assert_gray(tmp_path / "samples_0000200.png")


def assert_gray(path):
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert rgb.std() > 10, "a blank picture"
    assert (rgb.max(2) - rgb.min(2)).max() <= 1, "one-channel samples drawn in colour"


def test_one_channel_grids_are_gray(tmp_path):
    """One-channel samples are drawn in gray levels (imshow of an HxWx1 array would use a colour map)."""
    ramp = torch.linspace(-1, 1, 16 * 16).reshape(1, 1, 16, 16).repeat(9, 1, 1, 1)
    plot_image_grid(ramp, tmp_path / "gray.png", "gray")
    assert_gray(tmp_path / "gray.png")


def test_missing_scikit_learn_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(RuntimeError, match=r"needs scikit-learn: pip install .*\.\[digits\]"):
        DigitsDataset("train")
    assert cli.main(["train", "digits", "--out", str(tmp_path / "run"), "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"odegan: {DIGITS_EXTRA}"], err
    assert "[digits]" in DIGITS_EXTRA


def test_classifier_features_on_an_imagefolder_preset(tmp_path):
    """--set fid_features=classifier on an ImageFolder tree: the classifier learns the class folders' labels
    (each class one flat colour here) and every evaluation gets the three metrics; a tree of one class folder,
    or the classifier asked for alongside Inception's options or on the toy problems, is refused."""
    write_imagefolder(tmp_path / "data", classes=3, per_class=10, size=(32, 32))
    cfg = tiny_image_config(tmp_path, "imagefolder", width=4, batch=4, fid_features="classifier", eval_samples=30)
    res = Trainer(cfg).evaluate()
    assert set(res) == {"step", "fid_classifier", "coverage", "score"} and res["fid_classifier"] > 0
    info = json.loads((tmp_path / "run" / "classifier.json").read_text())
    assert info["heldout_accuracy"] == 1.0 and info["heldout_images"] == 6 and info["train_images"] == 24
    write_imagefolder(tmp_path / "one", classes=1, per_class=8, size=(32, 32))
    with pytest.raises(ValueError, match="has 1 class; give a tree of at least 2 class folders"):
        one = str(tmp_path / "one")
        Trainer(tiny_image_config(tmp_path, "imagefolder", data=one, batch=4, fid_features="classifier"))
    with pytest.raises(ValueError, match="fid_features=classifier judges samples"):
        make_config("imagefolder", fid_features="classifier", fid_real=str(tmp_path))
    with pytest.raises(ValueError, match="fid_features=classifier is for the image problems; 'mog'"):
        make_config("mog", fid_features="classifier")
    with pytest.raises(ValueError, match="fid_features must be one of"):
        make_config("digits", fid_features="clip")
    with pytest.raises(ValueError, match="ships with scikit-learn: drop --data"):
        Trainer(make_config("digits", data=str(tmp_path), out=str(tmp_path / "d")))


def _study():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "python" / "digits_study.py"
    spec = importlib.util.spec_from_file_location("digits_study", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_digits_study_stops_on_its_clock_and_tabulates_the_spread(tmp_path):
    """One run of python/digits_study.py, in its own process as the study runs them: stopped after its CPU-clock
    budget at a step boundary and evaluated there; the table gives mean [min, max] over seeds and counts
    divergences, with the steps at which they happened."""
    import subprocess

    study = _study()
    spec = dict(name="rk4-h0.04", opts={}, seed=0, seconds=1.0, clock="cpu", out=str(tmp_path / "run"))
    res = subprocess.run(
        [sys.executable, study.__file__, "--one", json.dumps(spec)], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["stopped"] == "time" and row["step"] > 0 and 1.0 <= row["train_s"] < 10, row
    assert row["fid_classifier"] > 0 and 0 <= row["coverage"] <= 1
    assert (tmp_path / "run" / f"samples_{row['step']:07d}.png").is_file()
    rows = [
        {**row, "seed": 1, "fid_classifier": 2 * row["fid_classifier"]},
        {**row, "seed": 2, "stopped": "diverged", "step": row["step"] + 3, "fid_classifier": None},
        row,
    ]
    line = study.table(rows).splitlines()[2]
    f = row["fid_classifier"]
    assert line.startswith(f"| rk4-h0.04 | 1,2,0 | {row['step']}-{row['step'] + 3} |"), line
    assert f"| {1.5 * f:.0f} [{f:.0f}, {2 * f:.0f}] |" in line and line.endswith(f"| 1/3 (steps {row['step'] + 3}) |")
