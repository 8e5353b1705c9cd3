"""CIFAR-10 folders are data, never code (issue 18, items 1 and 14): every file of the python archive is read by a
restricted unpickler that admits only what the format holds, and a damaged or incomplete folder is one line naming
the file."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torchvision", reason="image data needs torchvision (installed by the [dev] extra)")

from odegan_kernels.data import CIFAR10Batches, read_cifar_file  # noqa: E402

from .test_trainer import write_cifar10  # noqa: E402


class Payload:
    """A pickled object that writes a marker file when unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the payload ran"))


def _run(tmp_path, data) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "odegan_kernels", "train", "cifar10", "--data", str(data), "--out", str(tmp_path / "run"),
        "--steps", "1", "--device", "cpu", "--no-progress", "--set", "batch=4", "--set", "workers=0",
        "--set", "eval_samples=4",
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["batches.meta", "data_batch_3"])
def test_a_planted_payload_never_runs(tmp_path, where):
    data, marker = tmp_path / "data", tmp_path / "ran"
    write_cifar10(data, n=8)
    base = data / "cifar-10-batches-py"
    entry = pickle.loads((base / where).read_bytes())
    with open(base / where, "wb") as f:
        pickle.dump({**entry, "extra": Payload(str(marker))}, f)
    res = _run(tmp_path, data)
    assert res.returncode == 1 and not marker.exists(), res.stderr
    assert res.stderr.count("\n") == 1 and f"{where} was refused" in res.stderr and "Path.write_text" in res.stderr


def test_the_original_python2_format_reads(tmp_path):
    """The archive's own files are protocol-2 pickles of Python 2 (latin-1 strings, numpy's array rebuilder)."""
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(1)
    for i in range(1, 6):
        batch = {"batch_label": "training batch", "data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                 "labels": [1, 2, 3], "filenames": ["a.png", "b.png", "c.png"]}  # fmt: skip
        (base / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2))
    ds = CIFAR10Batches(base)
    assert len(ds) == 15 and ds.targets[:3] == [1, 2, 3] and ds.data.shape == (15, 32, 32, 3)
    img, y = ds[0]
    assert img.size == (32, 32) and y == 1


@pytest.mark.parametrize(
    "damage,phrase",
    [
        (lambda b: (b / "data_batch_2").write_bytes((b / "data_batch_2").read_bytes()[:100]), "data_batch_2 is not a"),
        (lambda b: (b / "data_batch_4").write_bytes(np.random.default_rng(0).bytes(500)), "data_batch_4"),
        (lambda b: (b / "batches.meta").write_bytes(pickle.dumps({"names": ["x"]})), "has no label_names list"),
        (
            lambda b: (b / "data_batch_1").write_bytes(
                pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4})
            ),
            "'data' must be a uint8 array of N x 3072 pixels, got uint8 (4, 100)",
        ),
        (lambda b: (b / "data_batch_5").unlink(), "data_batch_5 is missing: the CIFAR-10 folder is incomplete"),
    ],
)
def test_a_damaged_folder_is_one_line_naming_the_file(tmp_path, damage, phrase):
    data = tmp_path / "data"
    write_cifar10(data, n=8)
    damage(data / "cifar-10-batches-py")
    res = _run(tmp_path, data)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert phrase in res.stderr, res.stderr


def test_a_file_that_is_not_a_dict_is_named(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="holds a list, not a dict"):
        read_cifar_file(path)
