"""What a run writes besides checkpoints: metrics.jsonl (interval means and evaluations) and its plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class MetricsLog:
    """metrics.jsonl: one JSON row per log interval and per evaluation, appended; only rank 0 writes."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def clear(self) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)


class IntervalMeans:
    """Sums of the per-step statistics over a log interval, kept on the device (no host sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()

    def means(self, n: int, flag: torch.Tensor, world: int = 1) -> tuple[dict[str, float], bool]:
        """(each statistic's mean over ``n`` steps and over the ranks, whether any rank raised ``flag``), in one
        host sync and, under torchrun, one all-reduce, so every rank decides alike; then starts a new interval."""
        keys = list(self.sums)
        vals = torch.stack([self.sums[k].float().reshape(()) for k in keys] + [flag])
        if world > 1:
            torch.distributed.all_reduce(vals)
            vals[:-1] /= world
        out = vals.tolist()
        self.sums = {}
        return {k: v / n for k, v in zip(keys, out)}, out[-1] > 0


def plot_metrics(out: Path) -> None:
    """metrics.png: losses and evaluation metrics over training, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keys = [
        k
        for k in ("loss_d", "loss_g", "penalty", "modes", "high_quality", "kl", "radius", "fid")
        if any(k in r for r in rows)
    ]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
    axes = [axes] if len(keys) == 1 else axes
    for ax, k in zip(axes, keys):
        pts = [(r["step"], r[k]) for r in rows if k in r and r[k] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=80)
    plt.close(fig)
