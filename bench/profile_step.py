"""Where a training step's time goes: torch.profiler over a preset's trainer steps, by aten op.

    python -m bench.profile_step                     # the main job's step (preset mog), 20 profiled steps
    python -m bench.profile_step --preset mog-joint --steps 50

Prints the plain step rate (no profiler), the aten calls per step and the ops by self time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from torch.profiler import ProfilerActivity, profile

from odegan_kernels.train import Trainer, make_config
from odegan_kernels.train.config import PRESETS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mog", choices=sorted(PRESETS), metavar="PRESET", help="a trainer preset")
    ap.add_argument("--steps", type=int, default=20, help="profiled steps (the rate is timed over 15x as many)")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--data", default=None, help="the local data folder of an image preset (cifar10, imagefolder, ...)")
    args = ap.parse_args(argv)
    for name in ("steps", "rows"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    with tempfile.TemporaryDirectory() as out:
        extra = {"data": args.data} if args.data else {}
        try:
            tr = Trainer(make_config(args.preset, steps=10**9, out=out, progress=False, **extra))
        except (ValueError, OSError) as exc:  # the trainer's own one-line reasons: missing data, bad options
            ap.error(f"--preset {args.preset}: {exc}")
        for _ in range(50):
            tr.train_step()
        n = 15 * args.steps
        t = time.perf_counter()
        for _ in range(n):
            tr.train_step()
        dt = (time.perf_counter() - t) / n
        print(f"{args.preset}: {dt * 1e3:.2f} ms a step ({1 / dt:.0f} steps/s) without the profiler")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                tr.train_step()
    ops = prof.key_averages()
    print(f"aten calls per step: {sum(e.count for e in ops if e.key.startswith('aten::')) / args.steps:.0f}")
    print(ops.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
