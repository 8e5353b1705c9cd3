"""A run says which optimiser it ran (issue 19, item 3): its first line, plot titles and summary.json name the
optimiser actually used and whether a baseline carries ODE-GAN's regulariser; a baseline's config.json holds no
ODE-only options (nor an ODE run's the baselines' lr and betas), and such a config.json resumes its own run."""

from __future__ import annotations

import dataclasses
import json

import pytest

from odegan_kernels import cli
from odegan_kernels.train import Trainer, make_config
from odegan_kernels.train.config import ODE_ONLY, describe, load_config

FAST = dict(eval_every=10, log_every=5, plot_every=10, ckpt_every=10, eval_samples=64, batch=64, progress=False)


@pytest.mark.parametrize(
    "preset, options, says, never",
    [
        ("mog", {}, "ode rk4 h=0.1 reg=0.07", ("lr=", "adam")),
        ("mog", {"method": "euler", "h_g": 0.05}, "ode euler h=0.1 h_g=0.05 reg=0.07", ("lr=",)),
        ("mog-adam", {}, "adam lr=0.0001 betas=(0.5, 0.999) reg=0 (plain adam)", ("rk4", "h=", "ODE-GAN")),
        ("mog-adam", {"reg": 0.02}, "adam lr=0.0001 betas=(0.5, 0.999) + ODE-GAN's regulariser reg=0.02", ("rk4",)),
        ("mog", {"optimizer": "sgd", "lr": 0.01, "reg": 0.0}, "sgd lr=0.01 reg=0 (plain sgd)", ("betas", "rk4")),
        ("dirac-r1", {}, "r1=0.3", ()),
    ],
)
def test_describe_names_what_the_optimiser_does(preset, options, says, never):
    text = describe(make_config(preset, **options))
    assert says in text
    assert not any(n in text for n in never), text


def test_a_baseline_run_names_itself_and_writes_only_what_it_reads(tmp_path, capsys, monkeypatch):
    out = tmp_path / "adam"
    titles = []
    tr = Trainer(make_config("mog-adam", steps=10, out=str(out), **FAST))
    plot = tr.problem.plot
    monkeypatch.setattr(tr.problem, "plot", lambda x, path, title: (titles.append(title), plot(x, path, title)))
    tr.run()
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("mog: adam lr=0.0001") and "reg=0 (plain adam)" in first and "rk4" not in first
    assert titles and all(t.startswith("mog adam lr=0.0001") and "rk4" not in t for t in titles)
    assert json.loads((out / "summary.json").read_text())["run"] == describe(tr.cfg)
    written = json.loads((out / "config.json").read_text())
    assert not set(ODE_ONLY) & set(written) and written["lr"] == 1e-4 and written["optimizer"] == "adam"
    # The file resumes its own run (the options it leaves out are the ones Adam never reads) ...
    assert cli.main(["train", "--config", str(out / "config.json"), "--steps", "15", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["step"] == 15
    # ... and the preset it came from (whose h differs from the default) resumes it too.
    assert Trainer(make_config("mog-adam", steps=20, out=str(out), **FAST)).run()["step"] == 20


def test_an_ode_run_writes_no_baseline_options_and_its_file_round_trips(tmp_path):
    out = tmp_path / "ode"
    cfg = make_config("mog", steps=5, out=str(out), **FAST)
    Trainer(cfg).run()
    written = json.loads((out / "config.json").read_text())
    assert "lr" not in written and "betas" not in written and written["method"] == "rk4"
    again = json.loads(json.dumps(dataclasses.asdict(load_config(out / "config.json"))))
    assert {k: again[k] for k in written} == written


def test_an_ode_only_change_on_a_baseline_resume_is_still_refused(tmp_path, capsys):
    out = tmp_path / "adam"
    Trainer(make_config("mog-adam", steps=5, out=str(out), **FAST)).run()
    assert cli.main(["train", "mog-adam", "--steps", "10", "--out", str(out), "--h", "0.3"]) == 2
    assert "h does not apply to optimizer='adam'" in capsys.readouterr().err
    assert cli.main(["train", "mog", "--steps", "10", "--out", str(out), "--no-progress"]) == 1
    assert "optimizer='adam'" in capsys.readouterr().err
