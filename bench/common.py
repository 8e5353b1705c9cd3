"""Shared benchmark plumbing: timing (do_bench on GPU, a median timer on CPU), environment, CSV, tables."""

from __future__ import annotations

import csv
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_arg(ap, text: str) -> torch.device:
    """The --device of a benchmark: cpu, or cuda where torch sees one; anything else is the parser's one-line
    error (exit 2), not a traceback from deep inside the first kernel."""
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        ap.error(f"--device {text!r}: {exc}")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {text}, but torch sees no CUDA device here (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        ap.error(f"--device {text}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds per call of fn."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8], return_mode="median"
        )
        return float(med), float(p20), float(p80)
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(0.01 / once))  # batch calls into ~10 ms samples
    samples = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 200):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1000)
    samples.sort()
    q = statistics.quantiles(samples, n=10) if len(samples) >= 10 else [samples[0]] * 2 + [samples[-1]] * 7
    return statistics.median(samples), q[1], q[7]


def environment(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "-"
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return info


def append_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0].keys())
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def save_figure(fig, path: Path, title: str) -> None:
    """Title, tighten, write and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
