"""The ``odegan`` command: ``odegan train PRESET [options]``, ``odegan presets``, ``odegan backends``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from . import ops
from .train import (
    PRESETS,
    CheckpointError,
    Config,
    NonFiniteError,
    Trainer,
    TrainingInterrupted,
    load_config,
    make_config,
)
from .train.config import check_environment, coerce, nearest_options


def _parse_value(text: str):
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON (a plain word), or past a parser limit: the option's type decides
        return text
    return text if value is None else value  # null stays text: the option's type decides (None ignores a value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="odegan", description="ODE-GAN training with fused kernels.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a preset (resumes from OUT/checkpoint.pt if present)")
    t.add_argument("preset", nargs="?", choices=sorted(PRESETS), help="a preset (or --config FILE)")
    t.add_argument("--config", help="a JSON file of options (a run's own config.json works), instead of a preset")
    t.add_argument("--steps", type=int, help="train until this many steps (a finished run continues)")
    t.add_argument("--out", help="run folder (config, metrics.jsonl, plots, checkpoint)")
    t.add_argument("--seed", type=int, help="seed of the initial parameters and the data and noise streams")
    t.add_argument("--method", help="euler, heun, midpoint, ralston, rk3, rk4")
    t.add_argument("--h", type=float, help="step size (D's, and G's unless --h-g)")
    t.add_argument("--h-g", dest="h_g", type=float, help="G's step size")
    t.add_argument("--reg", type=float, help="regulariser weight lambda")
    t.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    t.add_argument("--backend", choices=["auto", *ops.BACKENDS], help="fused-op backend")
    t.add_argument("--data", help="local dataset path (cifar10: the folder holding cifar-10-batches-py)")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any Config field, e.g. --set coupling=joint --set eval_every=500",
    )
    t.add_argument(
        "--fresh", action="store_true", help="start over: an earlier run's files in --out move to OUT/replaced-<time>/"
    )
    t.add_argument(
        "--allow-change",
        action="store_true",
        help="resume although --h, --h-g, --reg or lr differ from the checkpoint's (recorded in metrics.jsonl)",
    )
    t.add_argument("--dry-run", action="store_true", help="print every option, its value and its meaning, and exit")
    t.add_argument("--no-progress", action="store_true", help="no progress bar: one line per log interval")
    sw = sub.add_parser("sweep", help="a grid of settings over seeds, trained as populations, with its spread")
    sw.add_argument("preset", choices=sorted(PRESETS), help="the preset every member starts from")
    sw.add_argument("--seeds", default="0-15", help="seeds: 0-15, 0,3,5 or a mix (default 0-15)")
    sw.add_argument("--h", help="step sizes, comma-separated (default: the preset's)")
    sw.add_argument("--reg", help="regulariser weights lambda, comma-separated (default: the preset's)")
    sw.add_argument("--method", help="methods, comma-separated: one population (or more) per method")
    sw.add_argument("--members", type=int, default=16, help="at most this many members per population (16)")
    sw.add_argument("--steps", type=int, help="steps of every member")
    sw.add_argument("--out", help="sweep folder (default runs/sweep-PRESET)")
    sw.add_argument("--ckpt-every", dest="ckpt_every", type=int, default=200, help="population steps per checkpoint")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other Config field")
    sw.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a further axis, any other Config field (r1, r2, wgan_gp, consensus, h_g share populations; others split)",
    )
    sub.add_parser("presets", help="list presets and their options")
    sub.add_parser("backends", help="which op backends run here, and why not")
    st = sub.add_parser("study", help="a study with closed-form answers: dirac (which training methods converge)")
    st.add_argument("name", choices=["dirac"])
    st.add_argument("args", nargs=argparse.REMAINDER, help="the study's own options (--steps, --h, --out, ...)")
    return p


def _set_options(items) -> list[tuple[str, object]]:
    """``--set KEY=VALUE`` items as (Config name, parsed value); ValueError names a malformed item or an unknown
    option (with today's name of a renamed one, or the nearest names)."""
    fields = {f.name for f in dataclasses.fields(Config)}
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set needs KEY=VALUE, got {item!r}")
        if key not in fields:
            near = nearest_options(key)
            hint = f"did you mean {' or '.join(near)}?" if near else "odegan train PRESET --dry-run lists them"
            raise ValueError(f"unknown option {key!r}; {hint}")
        out.append((key, _parse_value(value)))
    return out


def _split_values(text: str) -> list[str]:
    """``0,0.5`` or ``[0.5,0.9],[0,0.99]``: split at the commas outside brackets and quotes (a list-valued option's
    values keep theirs)."""
    parts, depth, quote, cur = [], 0, None, ""
    for c in text:
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += c
    return [p.strip() for p in [*parts, cur] if p.strip()]


def _vary_options(items, steps=None) -> dict:
    """``--vary KEY=V1,V2`` items as {Config name: [parsed values]} (the names checked as --set's are)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--vary needs KEY=V1,V2 (comma-separated values), got {item!r}")
        ((key, _),) = _set_options([item])
        if key in out:
            raise ValueError(f"--vary {key} is given twice: give its values once, comma-separated")
        if key == "steps" and steps is not None:
            raise ValueError("steps is given both by --steps and by --vary: give it once")
        out[key] = [_parse_value(v) for v in _split_values(item.partition("=")[2])]
    return out


def _options(args) -> dict:
    """The options given on the command line (flags and --set), by Config name; ValueError names a bad one."""
    overrides = {
        k: getattr(args, k) for k in ("steps", "out", "seed", "method", "h", "h_g", "reg", "device", "backend", "data")
    }
    for key, value in _set_options(args.set):
        flag = overrides.get(key)
        if flag is not None and flag != value:
            raise ValueError(f"{key} is given twice, as a flag ({flag!r}) and with --set ({value!r}): give it once")
        overrides[key] = value
    if args.no_progress:
        given = overrides.get("progress")
        if given is not None and coerce("progress", given, bool) is not False:
            raise ValueError(f"progress is given twice, as --no-progress and with --set ({given!r}): give it once")
        overrides["progress"] = False
    return overrides


def _train(args) -> int:
    try:
        if args.config and args.preset:
            raise ValueError("give a preset or --config FILE, not both")
        if not args.config and not args.preset:
            raise ValueError(f"give a preset ({', '.join(sorted(PRESETS))}) or --config FILE")
        overrides = _options(args)
        cfg = load_config(args.config, **overrides) if args.config else make_config(args.preset, **overrides)
        if not args.dry_run:
            check_environment(cfg)
    except (ValueError, TypeError, OSError) as exc:
        print(f"odegan: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        meaning = Config.help()
        for k, v in dataclasses.asdict(cfg).items():
            print(f"{k} = {json.dumps(v)}  # {meaning[k]}")
        return 0
    try:
        summary = Trainer(cfg).run(resume=not args.fresh, allow_change=args.allow_change)
    except TrainingInterrupted as exc:
        print(f"odegan: {exc}", file=sys.stderr)
        return 130
    except (NonFiniteError, CheckpointError, ValueError, TypeError, OSError, RuntimeError) as exc:
        print(f"odegan: {exc}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # under torchrun the trainer joined a group
            dist.destroy_process_group()
    if summary.get("rank", 0) == 0:
        print(json.dumps(summary))
    return 0


def _sweep(args) -> int:
    from .train.sweep import parse_seeds, parse_values, plan, run_sweep

    out = args.out or f"runs/sweep-{args.preset}"
    try:
        sets = dict(_set_options(args.set))
        if args.steps is not None:
            sets["steps"] = args.steps
        if args.ckpt_every < 1:
            raise ValueError(f"--ckpt-every must be >= 1, got {args.ckpt_every}")
        vary = _vary_options(args.vary, args.steps)
        pops = plan(
            args.preset,
            out,
            parse_seeds(args.seeds),
            parse_values(args.h, "h"),
            parse_values(args.reg, "reg"),
            parse_values(args.method, "method", str),
            sets,
            args.members,
            vary,
        )
        rows = run_sweep(pops, out, args.ckpt_every, axes=list(vary))  # every population built before the first step
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        print(f"odegan: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"odegan: interrupted; the same command resumes the sweep in {out}", file=sys.stderr)
        return 130
    print(json.dumps({"out": out, "settings": len(rows), "populations": len(pops)}))
    return 0


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
    if args.cmd == "sweep":
        return _sweep(args)
    if args.cmd == "study":
        from .study import main as study_main

        return study_main(args.args)
    return _train(args)


def console() -> None:
    """The ``odegan`` command as a process: main(), then exit without letting a late Ctrl-C (one pressed while the
    interpreter shuts down: DataLoader workers, TensorBoard) print a traceback after the one-line message."""
    code = main()
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    console()
