"""Image runs under hostile conditions (issue 18, items 3 and 14): a corrupt or truncated image is one line naming
the file, whether the loader has worker processes or not; SIGTERM to the whole process group (systemd, Slurm,
kill -- -PGID) stops the run at a step boundary with a checkpoint (exit 130), the loader's workers surviving it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("torchvision", reason="image data needs torchvision (installed by the [dev] extra)")

from .test_trainer import write_imagefolder  # noqa: E402


def _command(data, out, steps, workers):
    return [
        sys.executable, "-m", "odegan_kernels", "train", "imagefolder", "--data", str(data), "--out", str(out),
        "--steps", str(steps), "--device", "cpu", "--no-progress", "--set", "width=4", "--set", "batch=4",
        "--set", f"workers={workers}", "--set", "log_every=2", "--set", "eval_every=1000000",
        "--set", "plot_every=1000000", "--set", "ckpt_every=1000000", "--set", "eval_samples=4",
    ]  # fmt: skip


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_bad_image_is_one_line_naming_it(tmp_path, workers, damage):
    data = tmp_path / "data"
    write_imagefolder(data, per_class=4)
    bad = data / "n00000001" / "img_2.png"
    raw = bad.read_bytes()
    bad.write_bytes(b"\x89PNG not an image" if damage == "corrupt" else raw[: len(raw) // 2])
    res = subprocess.run(_command(data, tmp_path / "run", 20, workers), capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and "img_2.png cannot be read as an image" in res.stderr, res.stderr


def test_sigterm_to_the_process_group_stops_at_a_step_boundary(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    write_imagefolder(data, per_class=6)
    proc = subprocess.Popen(
        _command(data, out, 100_000, 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    for line in proc.stdout:  # wait until the run is past its first log rows (the workers are running)
        if line.startswith("step 4/") or time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGTERM at step" in err and "DataLoader worker" not in err, err
    assert (out / "checkpoint.pt").exists()
