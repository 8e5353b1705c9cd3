"""Kernel throughput: the RK stage op, a full RK4 combination, sqnorm and ema_update, for every backend and baseline.

    python -m bench.kernels                 # CPU: a small sweep of the CPU backends
    python -m bench.kernels --device cuda   # GPU: P from 1e4 to 1e9 (or what fits), every backend

Bytes counted per element (fp32, 4 bytes each): stage op with a != 0: reads g, x0, acc; writes acc, p
= 5 accesses. RK4 combination: stage 1 (a = 0, acc unread) 4 + stages 2-3 5 each + stage 4 (also
writes x0) 6 = 20. sqnorm: 1 read. ema_update: reads avg and params, writes avg = 3. Copy bandwidth
(read + write) is measured in the same run and every GB/s is also given as a percentage of it. Baselines: the
same stage over ~100 parameter tensors (per-tensor eager, as public ODE-GAN ports do it; the best torch._foreach
formulation), and torch.compile of the flat formulation. Rows are appended to a CSV; a markdown table and a PNG plot
are written next to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from odegan_kernels import ops
from odegan_kernels.ode import TABLEAUS, compile_tableau

from .common import (
    RESULTS,
    append_csv,
    bench,
    device_arg,
    environment,
    markdown_table,
    save_figure,
    sync,
)

RK4 = compile_tableau(TABLEAUS["rk4"])
# What --providers takes: the ops backends, and the baselines written here.
PROVIDERS = (*ops.BACKENDS, "per_tensor", "foreach_list", "compile")
H = 0.04


def rk4_coeffs(device) -> list[torch.Tensor]:
    """The four stages' [2, 5] coefficient tensors (D and G segments, same h)."""
    return [torch.tensor([[s.a, s.b, -H * s.c, -H * s.d, 0.0]] * 2, device=device) for s in RK4]


def param_sizes(total: int, count: int = 100) -> list[int]:
    """~count tensors summing to total, shaped like a conv net: a few big weights, many small biases."""
    weights = count // 2
    w = [2.0 ** (i % 7) for i in range(weights)]  # a spread of weight sizes
    scale = total * 0.99 / sum(w)
    sizes = [max(1, int(x * scale)) for x in w] + [max(1, total // (200 * count))] * (count - weights)
    sizes[0] += total - sum(sizes)
    return sizes


class Buffers:
    def __init__(self, n: int, device, gen):
        self.n = n
        self.g = torch.randn(n, device=device, generator=gen)
        self.x0 = torch.randn(n, device=device, generator=gen)
        self.acc = torch.randn(n, device=device, generator=gen)
        self.p = torch.empty(n, device=device)
        half = (n // 2) // 4 * 4
        self.segments = [(0, half), (half, n)]
        sizes = param_sizes(n)
        cut = [0]
        for s in sizes:  # each tensor starts 16-byte aligned, as FlatParams lays them out
            cut.append(min(n, -(-(cut[-1] + s) // 4) * 4))
        cut[-1] = n
        self.lists = {
            name: [buf[a:b] for a, b in zip(cut, cut[1:])]
            for name, buf in (("g", self.g), ("x0", self.x0), ("acc", self.acc), ("p", self.p))
        }


def per_tensor_stage(B: Buffers, s) -> None:
    a, b, c, d = s.a, s.b, -H * s.c, -H * s.d
    for g, x0, acc, p in zip(B.lists["g"], B.lists["x0"], B.lists["acc"], B.lists["p"]):
        acc.mul_(a).add_(g, alpha=b)
        p.copy_(x0).add_(g, alpha=c).add_(acc, alpha=d)


def foreach_list_stage(B: Buffers, s) -> None:
    a, b, c, d = s.a, s.b, -H * s.c, -H * s.d
    L = B.lists
    torch._foreach_mul_(L["acc"], a)
    torch._foreach_add_(L["acc"], L["g"], alpha=b)
    torch._foreach_copy_(L["p"], L["x0"])
    torch._foreach_add_(L["p"], L["g"], alpha=c)
    torch._foreach_add_(L["p"], L["acc"], alpha=d)


def _flat_stage(p, g, x0, acc, a, b, c, d):
    new_acc = a * acc + b * g
    acc.copy_(new_acc)
    p.copy_(x0 + c * g + d * new_acc)


_compiled = None


def compiled_stage(B: Buffers, s, scalars) -> None:
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_flat_stage, dynamic=False)
    _compiled(B.p, B.g, B.x0, B.acc, *scalars)


def run(device: torch.device, sizes: list[int], providers: list[str], out: Path, plot: bool = True) -> list[dict]:
    env = environment(device)
    gen = torch.Generator(device=device).manual_seed(0)
    coeffs = rk4_coeffs(device)
    rows = []

    def record(op, provider, n, ms, bytes_per_el, copy_gbs):
        med, p20, p80 = ms
        gbs = bytes_per_el * n / (med * 1e-3) / 1e9
        row = {
            "op": op,
            "provider": provider,
            "P": n,
            "median_ms": med,
            "p20_ms": p20,
            "p80_ms": p80,
            "GB_s": gbs,
            "pct_copy": 100 * gbs / copy_gbs if copy_gbs else float("nan"),
            "device": env["device"],
            "torch": env["torch"],
            "triton": env["triton"],
            "date": env["date"],
        }
        rows.append(row)
        print(
            f"{op:10s} {provider:14s} P={n:>11,d} {med:9.4f} ms {gbs:8.1f} GB/s {row['pct_copy']:6.1f}% of copy",
            flush=True,
        )

    def measure(n: int) -> None:
        B = Buffers(n, device, gen)
        src, dst = B.x0, B.p
        copy_ms = bench(lambda: dst.copy_(src), device)
        copy_gbs = 8 * n / (copy_ms[0] * 1e-3) / 1e9
        record("copy", "torch", n, copy_ms, 8, copy_gbs)
        st = RK4[1]  # a representative stage with a != 0 (reads acc)
        c1 = coeffs[1]
        scal = [torch.tensor(v, device=device) for v in (st.a, st.b, -H * st.c, -H * st.d)]
        stage_fns = {}
        for prov in providers:
            if prov in ops.BACKENDS:
                if not ops.supports(prov, device):
                    continue
                if prov == "reference" and n > 2**22:
                    continue
                stage_fns[prov] = (
                    lambda prov=prov: ops.rk_stage(B.p, B.g, B.x0, B.acc, c1, B.segments, backend=prov),
                    lambda prov=prov: [
                        ops.rk_stage(B.p, B.g, B.x0, B.acc, c, B.segments, write_x0=i == 3, backend=prov)
                        for i, c in enumerate(coeffs)
                    ],
                )
            elif prov == "per_tensor":
                if device.type == "cpu" and n > 2**22:
                    continue
                stage_fns[prov] = (lambda: per_tensor_stage(B, st), lambda: [per_tensor_stage(B, s) for s in RK4])
            elif prov == "foreach_list":
                stage_fns[prov] = (lambda: foreach_list_stage(B, st), lambda: [foreach_list_stage(B, s) for s in RK4])
            elif prov == "compile":
                rk4_scal = [[torch.tensor(v, device=device) for v in (s.a, s.b, -H * s.c, -H * s.d)] for s in RK4]
                stage_fns[prov] = (
                    lambda: compiled_stage(B, st, scal),
                    lambda: [compiled_stage(B, s, sc) for s, sc in zip(RK4, rk4_scal)],
                )
        for prov, (one, four) in stage_fns.items():
            try:
                record("stage", prov, n, bench(one, device), 20, copy_gbs)
                record("rk4", prov, n, bench(four, device), 80, copy_gbs)
            except Exception as exc:  # a baseline that cannot run here is reported, not fatal
                print(f"stage/rk4 {prov} failed at P={n}: {type(exc).__name__}: {exc}", flush=True)
        for prov in ops.BACKENDS:
            if prov not in providers or ops.why_unavailable(prov) is not None:
                continue
            if not ops.supports(prov, device) or (prov == "reference" and n > 2**22):
                continue
            ts = B.lists["g"]
            record("sqnorm", prov, n, bench(lambda prov=prov: ops.sqnorm(ts, backend=prov), device), 4, copy_gbs)
            ema = lambda prov=prov: ops.ema_update(B.acc, B.x0, 0.999, backend=prov)  # noqa: E731
            record("ema", prov, n, bench(ema, device), 12, copy_gbs)
        sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for n in sizes:
        start = len(rows)
        measure(n)
        sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # written after every size, so a run stopped at a time limit keeps what it measured
        append_csv(out, rows[start:])
        write_report(rows, out, env, plot)
    return rows


def write_report(rows: list[dict], out: Path, env: dict, plot: bool = True) -> None:
    md = out.with_suffix(".md")
    head = (
        f"# Kernel benchmark\n\n{env['device']} · torch {env['torch']} · triton {env['triton']} · "
        f"{env['date']}\n\nCommand: `{env['command']}`\n\nBytes per element: stage 20, rk4 80, sqnorm 4, ema 12 "
        "(every % is of the copy's rate, counting bytes read plus bytes written: a pure read stream such as sqnorm's "
        "moves bytes at that same total rate).\n\n"
    )
    cols = ["op", "provider", "P", "median_ms", "p20_ms", "p80_ms", "GB_s", "pct_copy"]
    md.write_text(head + markdown_table(rows, cols) + "\n" + speedups(rows))
    if not plot:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 4, figsize=(20, 4))
        for ax, op in zip(axes, ("stage", "rk4", "sqnorm", "ema")):
            for prov in sorted({r["provider"] for r in rows if r["op"] == op}):
                pts = [(r["P"], r["GB_s"]) for r in rows if r["op"] == op and r["provider"] == prov]
                ax.plot([p for p, _ in pts], [g for _, g in pts], marker="o", label=prov)
            cp = [(r["P"], r["GB_s"]) for r in rows if r["op"] == "copy"]
            ax.plot([p for p, _ in cp], [g for _, g in cp], "k--", label="copy")
            ax.set_xscale("log")
            ax.set_title(op)
            ax.set_xlabel("P (fp32 elements)")
            ax.set_ylabel("GB/s")
            ax.legend(fontsize=7)
        save_figure(fig, out.with_suffix(".png"), env["device"])
    except Exception as exc:
        print(f"plot skipped: {exc}")


def speedups(rows: list[dict]) -> str:
    """Ratios at the largest P where both sides ran: ours against the baselines."""
    lines = ["\n## Ratios (same run, largest P each pair shares)\n"]
    for op in ("rk4",):
        for ours in ("triton", "csrc", "foreach"):
            for base in ("foreach_list", "per_tensor", "compile"):
                mine = {r["P"]: r["median_ms"] for r in rows if r["op"] == op and r["provider"] == ours}
                theirs = {r["P"]: r["median_ms"] for r in rows if r["op"] == op and r["provider"] == base}
                common = sorted(set(mine) & set(theirs))
                if common:
                    p = common[-1]
                    lines.append(f"- {op}: {ours} is {theirs[p] / mine[p]:.2f}x faster than {base} at P={p:,}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-p", type=float, default=None, help="largest P (default: 1e9 or what memory allows)")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--out", default=None, help="CSV path (default bench/results/kernels_<device>.csv)")
    ap.add_argument("--sizes", default=None, help="comma-separated P values (e.g. 1e6,8e6,6.4e7), instead of the sweep")
    ap.add_argument("--no-plot", action="store_true", help="write the CSV and the markdown table only")
    args = ap.parse_args(argv)
    device = device_arg(ap, args.device)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    bad = [p for p in providers if p not in PROVIDERS]
    if bad or not providers:
        ap.error(f"--providers: unknown {bad or args.providers!r}; choose from {', '.join(PROVIDERS)}")
    runnable = [p for p in providers if p not in ops.BACKENDS or ops.supports(p, device)]
    if not runnable:
        why = "; ".join(f"{p}: {ops.why_unavailable(p) or f'not on {device.type}'}" for p in providers)
        ap.error(f"--providers {args.providers!r}: none of them runs on {device} ({why})")
    if args.max_p is not None and not args.max_p >= 1:
        ap.error(f"--max-p must be a positive size, got {args.max_p:g}")
    if args.sizes:
        try:
            sizes = [int(float(v)) for v in args.sizes.split(",")]
        except (ValueError, OverflowError):
            ap.error(f"--sizes must be comma-separated numbers, got {args.sizes!r}")
        if not all(n > 0 for n in sizes):
            ap.error(f"--sizes must be positive, got {args.sizes!r}")
    elif device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        top = min(args.max_p or 1e9, free * 0.7 / (5 * 4))  # five fp32 buffers
        sizes = [int(10**e) for e in range(4, 10) if 10**e <= top]
        sizes += [2**23] if 2**23 <= top else []
    else:
        top = args.max_p or 4e6
        sizes = [n for n in (10**4, 10**5, 10**6, 4 * 10**6) if n <= top]
    if not sizes:
        ap.error(f"--max-p {args.max_p:g} is below the sweep's smallest P (1e4): nothing to measure; give --sizes")
    sizes = sorted(set(sizes))
    out = Path(args.out) if args.out else RESULTS / f"kernels_{device.type}.csv"
    run(device, sizes, providers, out, plot=not args.no_plot)
    print(f"wrote {out}, {out.with_suffix('.md')}" + ("" if args.no_plot else f", {out.with_suffix('.png')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
