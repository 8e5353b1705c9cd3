"""What a run writes besides checkpoints: metrics.jsonl (interval means and evaluations) and its plot."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..files import append_line, read_lines, save_figure, write_file


class MetricsLog:
    """metrics.jsonl: one JSON row per log interval (it has ``steps_per_s``), per evaluation, and per event (it
    has ``event``), appended; only rank 0 writes."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            append_line(self.path, json.dumps(record))

    def clear(self) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def rows(self) -> list[dict]:
        """The rows written so far (a line torn by a kill is skipped; so is one that is not UTF-8, with a warning)."""
        if not self.path.exists():
            return []
        lines, bad = read_lines(self.path)
        if bad:
            warnings.warn(f"{self.path}: skipped {bad} line(s) that are not UTF-8 text", stacklevel=2)
        out = []
        for line in lines:
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # torn, garbled, or a number past Python's digit limit
                continue
            if isinstance(row, dict):
                out.append(row)
        return out

    def truncate(
        self, step: int, pending: tuple[str, ...] = (), rename: dict[str, str] | None = None, resumed: bool = False
    ) -> None:
        """Keep only what a run rolled back (or ``resumed``) at ``step`` has done: rows of earlier steps, rows of
        ``step`` whose kind ("log", "eval") is not still ``pending``, and the event rows: all of them after a rollback
        (its own and earlier ones), only those up to ``step`` on resume (the resumed run writes the later ones
        again, exactly). ``rename``: columns renamed since an older version wrote the file (old name -> new)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in self.rows() if _kept(r, step, pending, resumed)]
        if rename:
            keep = [{rename.get(k, k): v for k, v in r.items()} for r in keep]
        write_file(self.path, "".join(json.dumps(r) + "\n" for r in keep))


def _kept(row: dict, step: int, pending, resumed: bool) -> bool:
    s = row.get("step", 0)
    if not isinstance(s, (int, float)):
        return False
    if "event" in row:
        return not resumed or s <= step
    kind = "log" if "steps_per_s" in row else "eval"
    return s < step or (s == step and kind not in pending)


class IntervalMeans:
    """Sums of the per-step statistics over a log interval, kept on the device (no host sync per step); a
    non-finite statistic makes its sum non-finite, so the sums double as the divergence flag."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.seen: dict[str, int] = {}  # steps that reported each statistic (a lazy penalty: every k-th)

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.seen[k] = self.seen.get(k, 0) + 1
        self.count += 1

    def means(self, extra: list[torch.Tensor], world: int = 1) -> tuple[dict[str, float], list[float]]:
        """(each statistic's mean over the interval's steps and over the ranks, the ``extra`` 0-dim values summed
        over the ranks), in one host sync and, under torchrun, one all-reduce, so every rank decides alike.
        The sums stay until ``reset()`` (an interrupted log interval is logged on resume)."""
        keys, k = list(self.sums), len(extra)
        vals = torch.stack([self.sums[key].float().reshape(()) for key in keys] + [e.float() for e in extra])
        if world > 1:
            torch.distributed.all_reduce(vals)
            vals[: len(keys)] /= world
        out, n = vals.tolist(), max(self.count, 1)
        return {key: v / self.seen.get(key, n) for key, v in zip(keys, out)}, out[len(keys) :] if k else []

    def reset(self) -> None:
        """Start a new interval."""
        self.sums, self.count, self.seen = {}, 0, {}

    def state_dict(self) -> dict:
        sums = {k: v.detach().clone() for k, v in self.sums.items()}
        return {"sums": sums, "count": self.count, "seen": dict(self.seen)}

    def load_state_dict(self, state: dict, device=None) -> None:
        """``device``: where the sums live in this run (a checkpoint or a host-side snapshot may hold them
        elsewhere)."""
        self.sums = {k: v.to(device) if device is not None else v for k, v in state.get("sums", {}).items()}
        self.count = int(state.get("count", 0))
        self.seen = dict(state.get("seen", dict.fromkeys(self.sums, self.count)))


def write_summary(out: Path, result: dict, rate: float | None, run: str | None = None) -> dict:
    """summary.json (the last evaluation, the speed and ``run``, the optimiser in words) and metrics.png. ``rate``
    None: nothing ran this time, so the run's own speed is its last logged interval's."""
    if rate is None:
        rate = next(
            (r["steps_per_s"] for r in reversed(MetricsLog(out / "metrics.jsonl").rows()) if "steps_per_s" in r), 0.0
        )
    summary = {**result, "steps_per_s": rate, **({"run": run} if run else {})}
    write_file(Path(out) / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_metrics(Path(out))
    return summary


def plot_metrics(out: Path) -> None:
    """metrics.png: losses and evaluation metrics over training, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in MetricsLog(out / "metrics.jsonl").rows() if "event" not in r]
    keys = [
        k
        for k in ("loss_d", "loss_g", "g_reg", "modes", "high_quality", "kl", "radius", "fid")
        if any(k in r for r in rows)
    ]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
    axes = [axes] if len(keys) == 1 else axes
    for ax, k in zip(axes, keys):
        pts = [(r["step"], r[k]) for r in rows if k in r and r[k] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        if k == "radius" and all(p[1] > 0 for p in pts):
            ax.set_yscale("log")  # DiracGAN: convergence and divergence are exponential
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    save_figure(fig, out / "metrics.png", dpi=80)
    plt.close(fig)
    track = [(r["psi"], r["theta"]) for r in rows if "psi" in r and "theta" in r]
    if len(track) > 1:  # DiracGAN: the players' path in the (psi, theta) plane
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot([t[0] for t in track], [t[1] for t in track], "-", lw=1)
        ax.plot(*track[0], "go", label="start")
        ax.plot(*track[-1], "rs", label=f"step {rows[-1]['step']}")
        ax.plot(0, 0, "k+", ms=12, label="equilibrium")
        ax.set_xlabel("psi (D)")
        ax.set_ylabel("theta (G)")
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, out / "trajectory.png", dpi=80)
        plt.close(fig)


class Console:
    """What a run prints: a progress bar on a terminal (with ``progress``), else one line per log interval; an
    evaluation or a warning is one line either way. Piped output gets plain lines only, so nothing interleaves."""

    def __init__(self, enabled: bool, progress: bool, total: int, initial: int, desc: str) -> None:
        import sys

        self.enabled = enabled
        self.bar = None
        if enabled and progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc=desc, file=sys.stderr)
        self.total = total

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def interval(self, step: int, rec: dict[str, float], rate: float) -> None:
        """An interval's means: the bar's postfix, or a line."""
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items()})
        else:
            values = " ".join(f"{k}={v:.4g}" for k, v in rec.items())
            self.write(f"step {step}/{self.total} {values} ({rate:.1f} steps/s)")

    def evaluation(self, result: dict) -> None:
        self.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TensorBoardLog:
    """TensorBoard events beside metrics.jsonl (scalars, sample images or figures), when the tensorboard package
    is installed; otherwise nothing (it is never required)."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self.writer = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))

    def scalars(self, record: dict, prefix: str) -> None:
        if self.writer is None:
            return
        step = int(record.get("step", 0))
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()

    def picture(self, path: Path, step: int) -> None:
        """A picture the run drew (the samples' PNG), as an image at ``step``."""
        if self.writer is None:
            return
        import matplotlib.image

        self.writer.add_image("samples", matplotlib.image.imread(str(path))[..., :3], step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
