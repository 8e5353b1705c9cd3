"""What a run writes besides checkpoints: the metrics plot drawn from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


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
