"""Checkpoints and option files of 0.1 and 0.2 (tests/data/checkpoints/: written by those versions, see its README)
read through the one place that knows old formats (train.migrate_checkpoint, legacy.migrate_options), and resumed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from odegan_kernels.train import load_config, migrate_checkpoint, read_checkpoint
from odegan_kernels.train.legacy import FORMAT

DATA = Path(__file__).resolve().parent / "data" / "checkpoints"
VERSIONS = ("0.1", "0.2")
# What each version reached when it resumed its own checkpoint to step 20 (data/checkpoints/README.md), float32.
REACHED = {"sum": -3.063983860236476, "sumsq": 85.22776872867027, "numel": 2278}
# Another CPU rounds the 10 resumed steps differently: the tolerance of the trajectory guard's float32 mog case
# (100 x its measured one-ulp sensitivity 2e-6, relative to the parameters' norm); here the match is exact.
TOL = 2e-4


@pytest.mark.parametrize("version", VERSIONS)
def test_an_old_checkpoint_becomes_todays_format(version):
    old = read_checkpoint(DATA / version / "checkpoint.pt")
    new = migrate_checkpoint(old)
    assert new["format"] == FORMAT and set(new["run"]) == {"step", "pending", "means", "rng", "data"}
    assert new["run"]["step"] == 10 and new["config"]["reg_at"] == "after_step"
    assert "penalty" not in new["config"] and "penalty_at" not in new["config"] and "extra" not in new["config"]
    ode = new["opt"]["ode"]
    assert ode["reg_at"] == "after_step" and ode["steps"] == 10 and ode["penalties"] == []
    assert [g["lr"] for g in new["opt"]["param_groups"]] == [0.1, 0.1]
    assert new["scheduler"]["last_epoch"] == 10  # 0.1 saved none: rebuilt from the step count
    assert migrate_checkpoint(new) is new  # today's format is taken as it is


@pytest.mark.parametrize("version", VERSIONS)
def test_an_old_run_folder_resumes_where_its_own_version_went(version, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(DATA / version, out)
    cmd = [
        sys.executable, "-m", "odegan_kernels", "train", "mog", "--steps", "20", "--out", str(out), "--no-progress",
        "--set", "eval_every=5", "--set", "log_every=5", "--set", "eval_samples=64", "--set", "plot_every=1000000",
    ]  # fmt: skip
    env = {**os.environ, "ODEGAN_BACKEND": "foreach"}  # the backend the files were written with
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "resuming: " in res.stderr and "at step 10 of 20" in res.stderr
    state = read_checkpoint(out / "checkpoint.pt")
    assert state["format"] == FORMAT and state["run"]["step"] == 20
    p = torch.cat([v.reshape(-1).double() for k in ("D", "G") for v in state[k].values()])
    scale = REACHED["sumsq"] ** 0.5
    assert p.numel() == REACHED["numel"]
    assert abs(float(p.sum()) - REACHED["sum"]) <= TOL * scale, float(p.sum())
    assert abs(float((p * p).sum()) - REACHED["sumsq"]) <= TOL * REACHED["sumsq"], float((p * p).sum())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "steps_per_s" in r]
    assert [r["step"] for r in logged] == [5, 10, 15, 20]
    assert all("g_reg" in r and "penalty" not in r for r in logged), "the old column is renamed with the rest"


@pytest.mark.parametrize("version", VERSIONS)
def test_an_old_config_file_is_read_with_todays_names(version):
    cfg = load_config(DATA / version / "config.json")
    assert cfg.reg_at == "after_step" and cfg.reg_method == "double_backward" and cfg.seed == 3


def test_what_is_not_a_checkpoint_is_named():
    with pytest.raises(ValueError, match="lacks 'D', 'G', 'opt', 'rng'"):
        migrate_checkpoint({"step": 5})
    with pytest.raises(ValueError, match="format 99 is not one this version reads"):
        migrate_checkpoint({"format": 99})
    state = read_checkpoint(DATA / "0.2" / "checkpoint.pt")
    with pytest.raises(ValueError, match="step must be a count of steps, got 'abc'"):
        migrate_checkpoint({**state, "step": "abc"})
