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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mog")
    ap.add_argument("--steps", type=int, default=20, help="profiled steps (the rate is timed over 15x as many)")
    ap.add_argument("--rows", type=int, default=20)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(make_config(args.preset, steps=10**9, out=out, progress=False))
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
