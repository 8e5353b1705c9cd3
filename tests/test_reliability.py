"""Reliability of a run: unsafe or broken checkpoints, divergence recovery, exact resume after any interrupt
(Ctrl-C, SIGTERM, SIGKILL, at any moment), the metrics log across resumes, the run-folder lock, and options."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from odegan_kernels import cli
from odegan_kernels.train import CheckpointError, RunLock, Trainer, TrainingInterrupted, make_config, read_checkpoint

from .conftest import corrupt_once

FAST = dict(eval_every=10, log_every=5, plot_every=10, ckpt_every=10, eval_samples=256, progress=False)


def _rows(out: Path, drop=("steps_per_s",)) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def _uninterrupted(tmp_path, steps=30, **opts) -> Trainer:
    tr = Trainer(make_config("mog", steps=steps, out=str(tmp_path / "straight"), **{**FAST, **opts}))
    tr.run()
    return tr


class Payload:
    """A pickled object that writes a marker file when unpickled: what a planted checkpoint would carry."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the payload ran"))


def test_a_planted_payload_is_refused_and_never_runs(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "ran"
    out.mkdir()
    torch.save({"step": 3, "D": Payload(str(marker))}, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="refused because loading it could run code"):
        read_checkpoint(out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        Trainer(make_config("mog", steps=5, out=str(out), **FAST)).run()
    assert not marker.exists()
    assert cli.main(["train", "mog", "--steps", "5", "--out", str(out), "--no-progress"]) == 1
    assert not marker.exists()


def test_checkpoints_load_with_weights_only(tmp_path):
    tr = Trainer(make_config("mog-adam", steps=10, out=str(tmp_path), **FAST))
    tr.run()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # nothing in it needs pickle's code paths
    assert state["run"]["step"] == 10 and set(state) >= {"format", "run", "D", "G", "opt", "config"}
    assert set(state["run"]) == {"step", "pending", "means", "rng", "data"}


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_a_broken_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage, recwarn):
    straight = _uninterrupted(tmp_path, steps=30)
    out = tmp_path / "b"
    Trainer(make_config("mog", steps=20, out=str(out), **FAST)).run()  # checkpoints at 10 and 20
    assert read_checkpoint(out / "checkpoint.prev.pt")["run"]["step"] == 10
    data = (out / "checkpoint.pt").read_bytes()
    broken = {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"not a checkpoint" * 100}[damage]
    (out / "checkpoint.pt").write_bytes(broken)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is (empty, truncated or corrupt|corrupt)"):
        read_checkpoint(out / "checkpoint.pt")
    resumed = Trainer(make_config("mog", steps=30, out=str(out), **FAST))
    resumed.run()
    assert any("resuming from the previous checkpoint" in str(w.message) for w in recwarn)
    assert torch.equal(resumed.flat.params, straight.flat.params)  # from step 10, exactly
    assert _rows(out) == _rows(tmp_path / "straight")


def test_no_usable_checkpoint_is_one_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError, match=f"no usable checkpoint in {tmp_path}"):
        Trainer(make_config("mog", steps=5, out=str(tmp_path), **FAST)).run()


def test_divergence_is_rolled_back_with_a_smaller_step(tmp_path):
    """A transient blow-up (a corrupt batch, once) costs one rollback and a halved h; the run goes on."""
    tr = Trainer(make_config("mog", steps=30, out=str(tmp_path), **FAST))
    hit = corrupt_once(tr)
    summary = tr.run()
    assert hit and summary["step"] == 30 and torch.isfinite(tr.flat.params).all()
    events = [r for r in _rows(tmp_path) if r.get("event") == "diverged"]
    assert len(events) == 1 and (events[0]["step"], events[0]["rolled_back_to"]) == (15, 10)
    assert tr.opt.h == pytest.approx([0.05, 0.05])
    steps = [r["step"] for r in _rows(tmp_path) if "loss_d" in r]
    assert steps == [5, 10, 15, 20, 25, 30]  # the diverged interval was logged once, after the rollback


def test_runaway_parameters_get_a_warning_row(tmp_path, capsys):
    """|param| growing by orders of magnitude without becoming non-finite is reported, not silently finished."""
    cfg = make_config("dirac", steps=30, h=3.0, reg=0.0, method="euler", out=str(tmp_path), progress=False)
    cfg.log_every, cfg.eval_every = 5, 30
    Trainer(cfg).run()
    warnings = [r for r in _rows(tmp_path) if r.get("event") == "param_growth"]
    assert warnings and warnings[0]["max_abs"] > 1e3 * warnings[0]["initial_max_abs"]
    assert "warning: max |parameter|" in capsys.readouterr().out


def test_resume_with_a_changed_step_size_needs_allow_change(tmp_path):
    out = str(tmp_path)
    Trainer(make_config("mog", steps=10, out=out, **FAST)).run()
    with pytest.raises(ValueError, match="h=0.1 but this run asks for h=0.05.*--allow-change"):
        Trainer(make_config("mog", steps=20, h=0.05, out=out, **FAST)).run()
    with pytest.raises(ValueError, match="reg_method"):  # not changeable: the mathematics differ
        Trainer(make_config("mog", steps=20, reg_method="jvp", out=out, **FAST)).run()
    tr = Trainer(make_config("mog", steps=20, h=0.05, reg=0.1, out=out, **FAST))
    tr.run(allow_change=True)
    assert tr.opt.h == [0.05, 0.05] and tr.opt.reg == 0.1
    event = next(r for r in _rows(tmp_path) if r.get("event") == "resumed_with_changes")
    assert event["step"] == 10 and event["changes"] == {"h": [0.1, 0.05], "reg": [0.07, 0.1]}
    assert json.loads((tmp_path / "config.json").read_text())["h"] == 0.05
    assert cli.main(["train", "mog", "--steps", "25", "--h", "0.04", "--out", out, "--no-progress"]) == 1
    assert (
        cli.main(["train", "mog", "--steps", "25", "--h", "0.04", "--allow-change", "--out", out, "--no-progress"]) == 0
    )


@pytest.mark.parametrize("where", ["eval", "plot", "log", "ckpt"])
def test_ctrl_c_after_a_finished_step_resumes_exactly(tmp_path, where):
    """An interrupt during the work after a step (logging, evaluation, plotting, the checkpoint itself) loses
    nothing: the finished step is kept, the rest of its work is done on resume, and the run equals an
    uninterrupted one, row for row."""
    straight = _uninterrupted(tmp_path)
    out = tmp_path / "b"
    tr = Trainer(make_config("mog", steps=30, out=str(out), **FAST))
    target = {
        "eval": (tr.problem, "evaluate"),
        "plot": (tr.problem, "plot"),
        "log": (tr.metrics, "write"),
        "ckpt": (tr, "state_dict"),
    }[where]
    inner = getattr(*target)

    def interrupt(*args, **kw):
        if tr.step == 20 and not getattr(interrupt, "done", False) and (where != "log" or "loss_d" in args[0]):
            interrupt.done = True
            raise KeyboardInterrupt
        return inner(*args, **kw)

    setattr(*target, interrupt)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 20"):
        tr.run()
    assert read_checkpoint(out / "checkpoint.pt")["run"]["step"] == 20
    resumed = Trainer(make_config("mog", steps=30, out=str(out), **FAST))
    resumed.run()
    assert torch.equal(resumed.flat.params, straight.flat.params)
    assert _rows(out) == _rows(tmp_path / "straight")


def test_ctrl_c_mid_interval_keeps_the_interval_means(tmp_path):
    """A resume in the middle of a log interval logs the same means as an uninterrupted run (the interval's
    sums are checkpointed, and each mean is over the steps actually in it)."""
    _uninterrupted(tmp_path)
    out = tmp_path / "b"
    tr = Trainer(make_config("mog", steps=30, out=str(out), **FAST))
    inner = tr.closure

    def interrupt(stage):
        if tr.step == 17 and stage.index == 0:
            raise KeyboardInterrupt  # inside step 18: rolled back, its noise and data replayed on resume
        return inner(stage)

    tr.closure = interrupt
    with pytest.raises(TrainingInterrupted):
        tr.run()
    Trainer(make_config("mog", steps=30, out=str(out), **FAST)).run()
    assert _rows(out) == _rows(tmp_path / "straight")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_the_next_step_boundary(tmp_path, sig):
    straight = _uninterrupted(tmp_path)
    out = tmp_path / "b"
    tr = Trainer(make_config("mog", steps=30, out=str(out), **FAST))
    inner = tr.closure

    def signalling(stage):
        if tr.step == 13 and stage.index == 1 and stage.players == (0,):  # once (decoupled: a call per player)
            os.kill(os.getpid(), sig)  # arrives mid-step: the step finishes, then the run stops
        return inner(stage)

    tr.closure = signalling
    with pytest.raises(TrainingInterrupted, match=f"{sig.name} at step 14"):
        tr.run()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed = Trainer(make_config("mog", steps=30, out=str(out), **FAST))
    resumed.run()
    assert torch.equal(resumed.flat.params, straight.flat.params)
    assert _rows(out) == _rows(tmp_path / "straight")


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(CheckpointError, match=f"in use by another run \\(process {os.getpid()}\\)"):
            Trainer(make_config("mog", steps=5, out=str(tmp_path), **FAST)).run()
    Trainer(make_config("mog", steps=5, out=str(tmp_path), **FAST)).run()  # free again


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    Trainer(make_config("mog", steps=5, out=str(tmp_path), **FAST)).run()
    assert not list(tmp_path.glob("*.tmp"))


def _command(out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "odegan_kernels", "train", "mog", "--steps", str(steps), "--out", str(out),
            "--no-progress", "--set", "log_every=50", "--set", "eval_every=100", "--set", "ckpt_every=50",
            "--set", "plot_every=100000", "--set", "eval_samples=256"]  # fmt: skip


def test_ctrl_c_prints_one_line_and_resumes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(out, 100_000), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert err.startswith("odegan: SIGINT at step") and "rerun the same command to resume" in err


@pytest.mark.slow
def test_kill_loop_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL and SIGINT at random moments, several times, resuming each time: the end is the uninterrupted
    run's, parameters and metrics rows alike."""
    steps = 2500
    straight = tmp_path / "straight"
    subprocess.run(_command(straight, steps), check=True, capture_output=True, timeout=300)
    out, rng, reached = tmp_path / "killed", random.Random(0), []
    for i in range(5):
        # Paced by the run's own progress lines, not by the clock (a fast machine would finish early): each kill
        # comes at a random moment after the run has passed a random step, before the run's end.
        target = rng.randint(250 * i + 100, 250 * i + 300)
        proc = subprocess.Popen(
            _command(out, steps), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        watchdog = threading.Timer(120, proc.kill)  # a run that stops printing cannot hang the test
        watchdog.start()
        seen = []
        for line in proc.stdout:
            seen.append(line)
            m = re.match(r"step (\d+)/", line)
            if m and int(m.group(1)) >= target:
                break
        watchdog.cancel()
        assert proc.poll() is None, f"run {i} ended before step {target}:\n{''.join(seen[-20:])}"
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL if i % 2 == 0 else signal.SIGINT)
        proc.communicate(timeout=120)
        if (out / "checkpoint.pt").exists():
            reached.append(read_checkpoint(out / "checkpoint.pt")["run"]["step"])
    assert len(reached) == 5 and 0 < reached[-1] < steps, reached  # every kill landed mid-run
    subprocess.run(_command(out, steps), check=True, capture_output=True, timeout=300)
    a, b = read_checkpoint(straight / "checkpoint.pt"), read_checkpoint(out / "checkpoint.pt")
    assert a["run"]["step"] == b["run"]["step"] == steps
    for player in ("D", "G"):
        for k in a[player]:
            assert torch.equal(a[player][k], b[player][k]), (player, k)
    assert _rows(out) == _rows(straight)
    assert not list(out.glob("*.tmp"))


def test_option_values_are_checked_with_their_names(capsys):
    for args, msg in [
        (["--set", "h=abc"], "option h expects a number, got 'abc'"),
        (["--set", "ckpt_every=0"], "ckpt_every must be positive, got 0"),
        (["--set", "plot_every=-1"], "plot_every must be positive"),
        (["--set", "steps=2.5"], "option steps expects an integer, got 2.5"),
        (["--set", "progress=maybe"], "option progress expects true or false"),
        (["--set", "reg_method=exact"], "reg_method must be one of"),
        (["--set", "device=gpu"], "device must be cpu, cuda, cuda:N or auto"),
        (["--h", "nan"], "h must be positive and finite, got nan"),
        (["--set", "ema=0.99999999"], "rounds to 1.0 in float32"),
        (["--set", "instance_noise=nan"], "instance_noise must be >= 0, got nan"),
        (["--set", "penalty_every=0"], "penalty_every must be positive, got 0"),
        (["--set", "r1=null"], "option r1 expects a number, got 'null'"),
        (["--steps", "5", "--set", "steps=7"], "steps is given twice"),
        (["--set", "seed=18446744073709551615"], "seed must be < 2**63"),
    ]:
        assert cli.main(["train", "mog", "--dry-run", *args]) == 2, args
        assert msg in capsys.readouterr().err, args
    with pytest.raises(TypeError, match="option reg expects a number"):
        make_config("mog", reg="lots")


def test_options_the_optimiser_never_reads_are_refused(tmp_path, capsys):
    """h or method given to an Adam run, lr to an ODE run, betas to SGD: refused (they would change nothing)."""
    for args, msg in [
        (["mog-adam", "--h", "5"], "h does not apply to optimizer='adam'"),
        (["mog-adam", "--set", "method=euler", "--set", "coupling=joint"], "method, coupling do not apply"),
        (["dirac", "--set", "lr=5"], "lr does not apply to optimizer='ode'"),
        (["mog-adam", "--set", "optimizer=sgd", "--set", "betas=[0.1,0.2]"], "betas does not apply to optimizer='sgd'"),
    ]:
        assert cli.main(["train", *args, "--dry-run"]) == 2, args
        assert msg in capsys.readouterr().err, args
    assert cli.main(["train", "mog-adam", "--set", "lr=0.001", "--dry-run"]) == 0
    capsys.readouterr()
    Trainer(make_config("mog-adam", steps=1, out=str(tmp_path / "a"), **FAST)).run()  # its config.json
    assert cli.main(["train", "--config", str(tmp_path / "a" / "config.json"), "--h", "5", "--dry-run"]) == 2
    assert "h does not apply to optimizer='adam'" in capsys.readouterr().err


def test_config_file_round_trips(tmp_path, capsys):
    Trainer(make_config("mog", steps=5, out=str(tmp_path / "a"), **FAST)).run()
    assert cli.main(["train", "--config", str(tmp_path / "a" / "config.json"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "steps = 5  # train until this many steps" in lines and 'reg_at = "after_step"' in " ".join(lines)
    assert cli.main(["train", "mog", "--config", str(tmp_path / "a" / "config.json")]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["bookkeeping", "log_row"])
def test_a_second_signal_never_leaves_a_half_done_update(tmp_path, where):
    """Two Ctrl-Cs in the middle of a step's bookkeeping (the schedule stepped, the counter not yet), or right after
    a log row's sums were reset (its pending mark still set): the second waits for the update to finish whole, so
    the checkpoint it leaves is consistent and resumes exactly."""
    straight = _uninterrupted(tmp_path)
    out = tmp_path / "b"
    tr = Trainer(make_config("mog", steps=30, out=str(out), **FAST))
    owner, name = (tr.ema, "update") if where == "bookkeeping" else (tr.state.means, "reset")
    inner = getattr(owner, name)

    def then_twice(*args, **kw):
        result = inner(*args, **kw)
        if tr.step in (14, 15) and not getattr(then_twice, "done", False):
            then_twice.done = True
            os.kill(os.getpid(), signal.SIGINT)  # asks to stop at the next boundary
            os.kill(os.getpid(), signal.SIGINT)  # and now, in the middle of an update that must finish
        return result

    setattr(owner, name, then_twice)
    try:
        with pytest.raises(KeyboardInterrupt):
            tr.run()
    finally:
        delattr(owner, name)
    state = read_checkpoint(out / "checkpoint.pt")
    assert state["scheduler"]["last_epoch"] == state["run"]["step"] == state["opt"]["ode"]["steps"]
    resumed = Trainer(make_config("mog", steps=30, out=str(out), **FAST))
    resumed.run()
    assert torch.equal(resumed.flat.params, straight.flat.params)
    assert _rows(out) == _rows(tmp_path / "straight")


def test_library_edges_get_messages_that_name_them():
    """Cases a hostile test found: each is refused with a message naming the problem (or accepted as meant)."""
    import numpy as np

    from odegan_kernels import Batch, FlatParams, ODEStepper, game_gradients
    from odegan_kernels.contract import penalty_specs
    from odegan_kernels.models import mog_pair
    from odegan_kernels.ode import Tableau

    with pytest.raises(ValueError, match="every coefficient of A and b must be finite"):
        Tableau("bad", ((float("nan"),),), (0.5, 0.5), 2)
    D, G = mog_pair(z_dim=4, hidden=8)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        FlatParams(D=D, G=G, dtype="float32")
    # numpy scalars are numbers; a tuple of the wrong length and an overflowing lazy weight name the penalty
    (r1,) = penalty_specs({"r1": (np.float32(2), np.int64(3))})
    assert (r1.weight, r1.every) == (2.0, 3) and type(r1.weight) is float and type(r1.every) is int
    with pytest.raises(ValueError, match=r"penalty 'r1': give a weight or \(weight, every\)"):
        penalty_specs({"r1": (1.0, 2, 3)})
    with pytest.raises(ValueError, match="overflows"):
        penalty_specs({"r1": (1e308, 10)})
    # a stepper's state carries its penalties: loading it into one with others is refused
    flat = FlatParams(D=D, G=G)
    state = ODEStepper(flat, "rk4", penalties={"r1": (10.0, 4)}).state_dict()
    with pytest.raises(ValueError, match="penalties"):
        ODEStepper(flat, "rk4").load_state_dict(state)
    ODEStepper(flat, "rk4", penalties={"r1": (10.0, 4)}).load_state_dict(state)
    # a player cast after flattening is named before any gradient is touched
    st = ODEStepper(flat, "euler", h=0.1)
    D.double()
    x, z = torch.randn(8, 2), torch.randn(8, 4)
    with pytest.raises(RuntimeError, match=r"cast or moved \(.double\(\)"):
        st.step(lambda s: game_gradients(D, G, Batch(x, z), players=s.players))


def test_bad_paths_get_one_line(tmp_path, capsys):
    """--config that is a JSON list or a folder, --out that is a file: one line naming it, exit 2, nothing made."""
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "afile").write_text("mine")
    for args, msg in [
        (["--config", str(tmp_path / "list.json"), "--dry-run"], "must hold a JSON object of options, not list"),
        (["--config", str(tmp_path), "--dry-run"], "is a folder; give the JSON file"),
        (["mog", "--out", str(tmp_path / "afile"), "--steps", "2"], "is a file, not a folder"),
    ]:
        assert cli.main(["train", *args]) == 2, args
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert (tmp_path / "afile").read_text() == "mine"


# -- the second pass (issue 18): recovery before any checkpoint, exact rows and warnings across a resume ----------
def test_a_checkpoint_due_between_log_checks_never_preempts_recovery(tmp_path):
    """DiracGAN at h 5 diverges before its first log check; a checkpoint due first (every 20 steps) runs the
    divergence check, rolls back and goes on, where it used to stop with 'kept the last good checkpoint'."""
    cfg = make_config("dirac", h=5.0, steps=60, ckpt_every=20, out=str(tmp_path), progress=False)
    summary = Trainer(cfg).run()
    events = [r for r in _rows(tmp_path) if r.get("event") == "diverged"]
    # step 20's check passes (psi 3e13), step 40's sees NaN and goes back to step 20, the last good state
    assert summary["step"] == 60 and events and (events[0]["step"], events[0]["rolled_back_to"]) == (40, 20)
    assert torch.isfinite(read_checkpoint(tmp_path / "checkpoint.pt")["D"]["psi"]).all()


def test_a_stop_request_on_a_diverged_state_saves_the_last_good_one(tmp_path):
    """A signal when the state is non-finite (h 5 before any check): roll back, save that, stop as a stop does."""
    tr = Trainer(make_config("dirac", h=5.0, steps=600, out=str(tmp_path), progress=False))
    inner = tr.closure

    def signalling(stage):
        if tr.step == 30 and stage.index == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return inner(stage)

    tr.closure = signalling
    with pytest.raises(TrainingInterrupted, match="SIGINT at step"):
        tr.run()
    state = read_checkpoint(tmp_path / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["D"].values())
    assert [r for r in _rows(tmp_path) if r.get("event") == "diverged"]


class _Killed(BaseException):
    """What a SIGKILL leaves: nothing after it runs (no checkpoint, no handler)."""


def test_a_kill_just_after_a_rollback_resumes_to_the_same_rows(tmp_path):
    """The diverged row of a rollback that the last checkpoint predates is written again by the resumed run
    (which diverges the same way): kept once, as in the uninterrupted run, not twice."""
    straight = Trainer(make_config("mog", steps=30, out=str(tmp_path / "straight"), **FAST))
    corrupt_once(straight)
    straight.run()
    out = tmp_path / "killed"
    tr = Trainer(make_config("mog", steps=30, out=str(out), **FAST))
    corrupt_once(tr)
    write = tr.metrics.write

    def dying(row):
        write(row)
        if row.get("event") == "diverged":
            raise _Killed

    tr.metrics.write = dying
    with pytest.raises(_Killed):
        tr.run()
    resumed = Trainer(make_config("mog", steps=30, out=str(out), **FAST))
    corrupt_once(resumed)
    resumed.run()
    assert _rows(out) == _rows(tmp_path / "straight")
    assert torch.equal(resumed.flat.params, straight.flat.params)


def test_parameter_growth_warnings_survive_a_resume(tmp_path):
    opts = dict(h=3.0, reg=0.0, method="euler", progress=False, log_every=5, eval_every=30, ckpt_every=10)
    Trainer(make_config("dirac", steps=30, out=str(tmp_path / "straight"), **opts)).run()
    Trainer(make_config("dirac", steps=10, out=str(tmp_path / "resumed"), **opts)).run()
    Trainer(make_config("dirac", steps=30, out=str(tmp_path / "resumed"), **opts)).run()

    def warnings(out):
        return [(r["step"], r["max_abs"]) for r in _rows(out) if r.get("event") == "param_growth"]

    assert len(warnings(tmp_path / "straight")) == 5
    assert warnings(tmp_path / "resumed") == warnings(tmp_path / "straight")
