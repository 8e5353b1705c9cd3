"""The files of a run folder (issue 18): a link planted where the run writes never has its target written (the
lock, metrics.jsonl, config.json, summary.json, the plots), a checkpoint that is a FIFO is refused without hanging,
and a line of metrics.jsonl that is not UTF-8 is skipped with a warning, not a run that cannot resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from odegan_kernels.train import CheckpointError, Trainer, make_config, read_checkpoint

FAST = dict(steps=10, eval_every=10, log_every=5, plot_every=10, ckpt_every=10, eval_samples=64, progress=False)


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl", "config.json", "summary.json", "samples_0000010.png"])
def test_a_planted_link_never_has_its_target_written(tmp_path, name):
    out, precious = tmp_path / "run", tmp_path / "precious.txt"
    out.mkdir()
    precious.write_text("do not touch\n")
    (out / name).symlink_to(precious)
    try:
        Trainer(make_config("mog", out=str(out), **FAST)).run()
    except (CheckpointError, OSError) as exc:  # the lock and the log refuse the link, naming it
        assert name in str(exc) and "link" in str(exc)
    else:  # the others are written beside and renamed over it: the link is replaced, its target kept
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0
    assert precious.read_text() == "do not touch\n"


def test_a_lock_that_is_a_link_is_refused_in_one_line(tmp_path):
    out, precious = tmp_path / "run", tmp_path / "precious.txt"
    out.mkdir()
    precious.write_text("data\n")
    (out / ".lock").symlink_to(precious)
    cmd = [sys.executable, "-m", "odegan_kernels", "train", "mog", "--steps", "5", "--out", str(out), "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert ".lock is a symbolic link" in res.stderr and precious.read_text() == "data\n"


def test_a_checkpoint_that_is_a_fifo_is_refused_without_hanging(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="checkpoint.pt is a FIFO, not a regular file"):
        read_checkpoint(out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="FIFO"):
        Trainer(make_config("mog", out=str(out), **FAST)).run()


def test_a_line_of_metrics_that_is_not_utf8_is_skipped_with_a_warning(tmp_path):
    out = tmp_path / "run"
    Trainer(make_config("mog", out=str(out), **FAST)).run()
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "note": "\xff\xfe"}\n')
    with pytest.warns(UserWarning, match="skipped 1 line.* not UTF-8"):
        summary = Trainer(make_config("mog", out=str(out), **{**FAST, "steps": 15})).run()
    assert summary["step"] == 15
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "steps_per_s" in r] == [5, 10, 15]
