"""What a hostile or careless command line gets (issue 18): one line naming the problem and exit status 2 for
options, 1 for a run folder that cannot be used, never a traceback; and no traceback on a late Ctrl-C."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from odegan_kernels import cli
from odegan_kernels.train import Trainer, make_config

FAST = dict(eval_every=10, log_every=5, plot_every=10, ckpt_every=10, eval_samples=64, progress=False)


def _one_line(capsys, code, want_code, *phrases):
    err = capsys.readouterr().err
    assert code == want_code, err
    assert err.count("\n") == 1 and err.startswith("odegan: ") and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in err, err


@pytest.mark.parametrize(
    "argv,phrases",
    [
        (["--out", ""], ["out is empty"]),
        (["--set", "progress=maybe", "--no-progress"], ["option progress expects true or false, got 'maybe'"]),
        (["--set", "progress=true", "--no-progress"], ["progress is given twice"]),
        (["--set", "seed=" + "9" * 5000], ["option seed expects an integer", "(too large)"]),
        (["--set", "penalty_at=after_step"], ["unknown option 'penalty_at'; did you mean reg_at?"]),
    ],
)
def test_bad_options_are_one_line_and_exit_2(argv, phrases, capsys, tmp_path):
    code = cli.main(["train", "mog", "--dry-run", *argv] if "--out" not in argv else ["train", "mog", *argv])
    _one_line(capsys, code, 2, *phrases)


@pytest.mark.parametrize(
    "content,phrases",
    [
        (b'{"seed": ' + b"9" * 5000 + b"}", ["config.json is not a JSON file of options", "digits"]),
        (b'{"seed": 1, "note": "\xff"}', ["config.json is not UTF-8 text"]),
        (b"[" * 100_000 + b"]" * 100_000, ["config.json nests its JSON too deeply to read"]),
    ],
)
def test_bad_config_files_name_the_file(content, phrases, capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    _one_line(capsys, cli.main(["train", "--config", str(path), "--dry-run"]), 2, *phrases)


def _run_folder(tmp_path):
    out = tmp_path / "run"
    Trainer(make_config("mog", steps=5, out=str(out), **FAST)).run()
    return out


@pytest.mark.parametrize(
    "damage,phrases",
    [
        (lambda s: {"step": 5}, ["checkpoint.pt: the checkpoint lacks 'D', 'G', 'opt', 'rng'"]),
        (lambda s: {**s, "run": {**s["run"], "step": "abc"}}, ["step must be a count of steps, got 'abc'"]),
        (lambda s: {**s, "D": {k: torch.zeros(3) for k in s["D"]}}, ["does not fit this run", "size mismatch"]),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_one_line_naming_it(damage, phrases, capsys, tmp_path):
    out = _run_folder(tmp_path)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save(damage(state), out / "checkpoint.pt")
    (out / "checkpoint.prev.pt").unlink(missing_ok=True)
    code = cli.main(["train", "mog", "--steps", "10", "--out", str(out), "--no-progress"])
    _one_line(capsys, code, 1, *phrases)


def test_a_late_ctrl_c_at_exit_prints_no_traceback(tmp_path):
    """A Ctrl-C while the interpreter shuts down (here: raised by an exit handler) is ignored by the command."""
    code = (
        "import atexit, os, signal, sys\n"
        "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n"
        "sys.argv = ['odegan', 'presets']\n"
        "from odegan_kernels.cli import console\n"
        "console()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0 and "Exception ignored" not in res.stderr and "KeyboardInterrupt" not in res.stderr


def test_the_study_refuses_an_empty_out(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["study", "dirac", "--out", ""])
    assert exc.value.code == 2 and "--out is empty" in capsys.readouterr().err


def test_a_dry_run_of_a_0_2_config_file_reads_its_names(tmp_path, capsys):
    from pathlib import Path

    old = Path(__file__).resolve().parent / "data" / "checkpoints" / "0.2" / "config.json"
    assert cli.main(["train", "--config", str(old), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert 'reg_at = "after_step"' in " ".join(lines) and json.loads(old.read_text())["penalty_at"] == "after_step"
