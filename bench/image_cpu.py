"""Image presets on a CPU: training steps per second by model width and CPU thread count.

    python -m bench.image_cpu                       # digits (16x16) and imagefolder (32x32 gray) at widths 4-16
    python -m bench.image_cpu --widths 8 --threads 1 2 --repeats 5

Each row is one preset, width and thread count: whole trainer steps (the preset's RK4 step with the regulariser,
a fresh batch per stage, data loading included), timed after warm-up steps. The settings are timed round-robin,
``--repeats`` times, and the median and range are reported, so a busy (shared) machine slows every row alike.
The imagefolder rows read scikit-learn's digits written as a 32x32 grayscale ImageFolder tree (PNG files), the
data a new user tried (--set channels=1). Writes bench/results/image_cpu.csv and image_cpu.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from odegan_kernels.data import DigitsDataset
from odegan_kernels.train import Trainer, make_config

from .common import RESULTS, append_csv, environment, markdown_table


def write_digits_imagefolder(root: Path, size: int = 32) -> None:
    """The digits' train split as root/<digit>/<i>.png, size x size grayscale."""
    ds = DigitsDataset("train")
    for i in range(len(ds)):
        image, label = ds[i]
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.convert("L").resize((size, size)).save(folder / f"{i:04d}.png")


def trainer(preset: str, width: int, threads: int, data: str | None, out: str) -> Trainer:
    opts = dict(width=width, threads=threads, device="cpu", out=out, progress=False, tensorboard=False)
    if preset == "imagefolder":
        opts.update(data=data, channels=1, workers=0)
    return Trainer(make_config(preset, **opts))


def steps_per_s(tr: Trainer, steps: int, warmup: int, clock=time.perf_counter) -> float:
    for _ in range(warmup):
        tr.train_step()
    t0 = clock()
    for _ in range(steps):
        tr.train_step()
    return steps / (clock() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["digits", "imagefolder"])
    p.add_argument("--widths", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tag", default="", help="a note kept in each row (e.g. the machine's load)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: the process's CPU time, which other work on a shared machine does not inflate (one thread only)",
    )
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.threads != [1]:
        p.error("--clock cpu times one thread: the CPU time of two threads is their sum; give --threads 1")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    env = environment(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="odegan-bench-") as tmp:
        data = Path(tmp) / "digits32"
        if "imagefolder" in args.presets:
            write_digits_imagefolder(data)
        grid = [(pr, w, t) for pr in args.presets for w in args.widths for t in args.threads]
        rates: dict[tuple, list[float]] = {g: [] for g in grid}
        batch: dict[tuple, int] = {}
        for r in range(args.repeats):
            for g in grid if r % 2 == 0 else grid[::-1]:  # alternate the order: drifting load hits all alike
                tr = trainer(*g, data=str(data), out=str(Path(tmp) / "run"))
                batch[g] = tr.cfg.batch
                rates[g].append(steps_per_s(tr, args.steps, args.warmup, clock))
                print(g, f"{rates[g][-1]:.2f} steps/s", flush=True)
    rows = []
    for (preset, width, threads), rs in rates.items():
        rows.append(
            dict(
                preset=preset,
                image_size=16 if preset == "digits" else 32,
                width=width,
                batch=batch[(preset, width, threads)],
                threads=threads,
                steps_per_s=round(statistics.median(rs), 2),
                min=round(min(rs), 2),
                max=round(max(rs), 2),
                repeats=len(rs),
                clock=args.clock,
                tag=args.tag,
                **env,
            )
        )
    append_csv(RESULTS / "image_cpu.csv", rows)
    cols = ["preset", "image_size", "width", "batch", "threads", "steps_per_s", "min", "max", "repeats", "clock", "tag"]
    table = markdown_table(rows, cols)
    (RESULTS / "image_cpu.md").write_text(
        f"# Image presets on the CPU ({env['date']}, {env['device']}, torch {env['torch']})\n\n"
        f"`{env['command']}`\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
