"""The ``odegan`` command: ``odegan train PRESET [options]``, ``odegan presets``, ``odegan backends``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .train import PRESETS, Config, NonFiniteError, Trainer, make_config
from .train.config import RENAMED


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="odegan", description="ODE-GAN training with fused kernels.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a preset (resumes from OUT/checkpoint.pt if present)")
    t.add_argument("preset", choices=sorted(PRESETS))
    t.add_argument("--steps", type=int)
    t.add_argument("--out", help="run folder (config, metrics.jsonl, plots, checkpoint)")
    t.add_argument("--seed", type=int)
    t.add_argument("--method", help="euler, heun, midpoint, ralston, rk3, rk4")
    t.add_argument("--h", type=float, help="step size (D's, and G's unless --h-g)")
    t.add_argument("--h-g", dest="h_g", type=float, help="G's step size")
    t.add_argument("--reg", type=float, help="regulariser weight lambda")
    t.add_argument("--device")
    t.add_argument("--backend", choices=["auto", "triton", "csrc", "foreach", "reference", "cuda"], help="fused-op backend (cuda: the deprecated name of csrc)")
    t.add_argument("--data", help="local dataset path (cifar10: the folder holding cifar-10-batches-py)")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any Config field, e.g. --set coupling=joint --set eval_every=500",
    )
    t.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("--no-progress", action="store_true")
    sub.add_parser("presets", help="list presets and their options")
    sub.add_parser("backends", help="which op backends run here, and why not")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "presets":
        for name, opts in PRESETS.items():
            print(f"{name}: {opts}")
        return 0
    if args.cmd == "backends":
        from . import ops

        for b in ops.BACKENDS:
            why = ops.why_unavailable(b)
            print(f"{b:10s} {'available' if why is None else 'unavailable: ' + why}")
        return 0
    overrides = {
        k: getattr(args, k) for k in ("steps", "out", "seed", "method", "h", "h_g", "reg", "device", "backend", "data")
    }
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for item in args.set:
        key, sep, value = item.partition("=")
        key = RENAMED.get(key, key)
        if not sep:
            print(f"odegan: --set needs KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        if key not in fields:
            print(f"odegan: unknown option {key!r}; options are {sorted(fields)}", file=sys.stderr)
            return 2
        overrides[key] = _parse_value(value)
    if args.no_progress:
        overrides["progress"] = False
    try:
        cfg = make_config(args.preset, **overrides)
    except (ValueError, TypeError) as exc:
        print(f"odegan: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    try:
        summary = Trainer(cfg).run(resume=not args.fresh)
    except (NonFiniteError, ValueError, FileNotFoundError) as exc:
        print(f"odegan: {exc}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # under torchrun the trainer joined a group
            dist.destroy_process_group()
    if summary.get("rank", 0) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
