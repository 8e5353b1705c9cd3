"""The DiracGAN study's outputs: one row per method (converged or not, distance to the equilibrium, the field's
Jacobian eigenvalues at it, autograd and closed form, the step map's spectral radius), as Markdown and JSON, and
one figure of every method's trajectory over its vector field.

    odegan study dirac [--steps N] [--h H] [--out DIR]      # or: python python/dirac_study.py
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from ..files import save_figure, write_file
from .dirac import (
    START,
    STEPS,
    TOL,
    H,
    Method,
    Run,
    closed_form,
    field,
    jacobian,
    methods,
    step_map_radius,
    trajectory,
)


def _fmt_eigs(eigs) -> str:
    if eigs is None or any(not math.isfinite(abs(complex(e))) for e in eigs):
        return "none: \\|psi\\| is not differentiable at psi = 0"
    out = []
    for e in eigs:
        e = complex(e)
        re_, im = (0.0 if abs(e.real) < 1e-12 else e.real), (0.0 if abs(e.imag) < 1e-12 else e.imag)
        out.append(f"{re_:+.4f}{im:+.4f}i" if im else f"{re_:+.4f}")
    return ", ".join(out)


def study(steps: int = STEPS, h: float = H, which: list[Method] | None = None) -> list[dict]:
    """Run every method; one row each (the trajectory kept under 'points')."""
    rows = []
    for m in which or methods():
        pts = trajectory(m, steps, h)
        dist = math.hypot(*pts[-1]) if len(pts) == steps + 1 else math.inf
        J = jacobian(m)
        eig = torch.linalg.eigvals(J).tolist() if torch.isfinite(J).all() else [complex("nan")] * 2
        rows.append(
            {
                "method": m.name,
                "update": m.update,
                "converged": dist <= TOL,
                "distance": dist,
                "eigenvalues": [complex(e) for e in eig],
                "closed_form": closed_form(m),
                "radius": step_map_radius(m, h),
                "points": pts,
                "spec": m,
            }
        )
    return rows


def markdown(rows: list[dict], steps: int, h: float) -> str:
    head = (
        f"DiracGAN from (psi, theta) = {START}, h = {h}, {steps} steps; converged: distance to (0, 0) <= {TOL}.\n\n"
        "| method | update | converged | distance after N | Jacobian eigenvalues (autograd) | closed form "
        "| step-map spectral radius |\n| --- | --- | --- | --- | --- | --- | --- |\n"
    )
    body = []
    for r in rows:
        auto = _fmt_eigs(r["eigenvalues"])
        cf = _fmt_eigs(r["closed_form"]) if r["closed_form"] is not None else "-"
        dist = f"{r['distance']:.2e}" if math.isfinite(r["distance"]) else "diverged"
        radius = f"{r['radius']:.10f}" if r["closed_form"] is not None else "none (the step map jumps at psi = 0)"
        ok = "yes" if r["converged"] else "no"
        body.append(f"| {r['method']} | {r['update']} | {ok} | {dist} | {auto} | {cf} | {radius} |")
    return head + "\n".join(body) + "\n"


def figure(rows: list[dict], path: Path, lim: float = 2.5) -> None:
    """Every method's trajectory over its own (regularised) vector field (arrows: its direction), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    cols = 4
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(3.2 * cols, 3.0 * math.ceil(n / cols)))
    grid = torch.linspace(-lim, lim, 13, dtype=torch.float64)
    fields = {}
    for ax, r in zip(axes.flat, rows):
        m = r["spec"]
        key = (m.loss, tuple(sorted(m.penalties.items())), m.reg, m.noise)
        if key not in fields:  # the field depends on the regularisers only, not on how it is integrated
            run = Run(m, 0.0, 0.0)
            uv = [[field(m, torch.tensor([p, t], dtype=torch.float64), run).detach() for t in grid] for p in grid]
            fields[key] = torch.tensor([[[float(v[1]), float(v[0])] for v in row] for row in uv])
        uv = fields[key]  # [psi index, theta index, (d theta, d psi)]
        uv = uv / uv.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        T, P = torch.meshgrid(grid, grid, indexing="xy")  # T[i, j] = theta_j, P[i, j] = psi_i
        ax.quiver(T, P, uv[..., 0], uv[..., 1], color="0.6", angles="xy", scale=30, width=0.004)
        pts = torch.tensor([p for p in r["points"] if max(map(abs, p)) < 10 * lim])
        ax.plot(pts[:, 1], pts[:, 0], lw=0.9, color="C3" if not r["converged"] else "C0")
        ax.plot([START[1]], [START[0]], "k.", ms=5)
        if m.clip is not None:
            ax.axhline(m.clip, color="0.3", lw=0.5, ls="--")
            ax.axhline(-m.clip, color="0.3", lw=0.5, ls="--")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        dist = f"{r['distance']:.1e}" if math.isfinite(r["distance"]) else "diverged"
        ax.set_title(f"{r['method']}, {r['update']}\ndistance after {len(r['points']) - 1} steps: {dist}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.supxlabel("theta (generator)")
    fig.supylabel("psi (discriminator)")
    fig.tight_layout()
    save_figure(fig, path, dpi=72)
    plt.close(fig)
    try:  # a 64-colour palette: a sixth of the bytes, the same picture (line art)
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.open(path).convert("P", palette=Image.ADAPTIVE, colors=64).save(buf, format="PNG", optimize=True)
        write_file(path, buf.getvalue())
    except ImportError:
        pass


def _json_safe(x):
    """x with every non-finite float as null (JSON has no Infinity or NaN; a diverged method's distance is inf)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="odegan study dirac", description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--steps", type=int, default=STEPS, help=f"steps of every method (default {STEPS})")
    ap.add_argument("--h", type=float, default=H, help=f"the step size of every method (default {H})")
    ap.add_argument("--out", default="runs/dirac_study", help="folder for table.md, table.json, trajectories.png")
    ap.add_argument("--no-figure", action="store_true")
    args = ap.parse_args(argv)
    if not args.out:
        ap.error("--out is empty: give a folder (a script's unset variable would write into the current folder)")
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if not (math.isfinite(args.h) and args.h > 0):
        ap.error(f"--h must be positive and finite, got {args.h}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        ap.error(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    rows = study(args.steps, args.h)
    md = markdown(rows, args.steps, args.h)
    write_file(out / "table.md", md)
    keep = ("method", "update", "converged", "distance", "radius")
    js = [
        {
            **{k: r[k] for k in keep},
            "eigenvalues": [[e.real, e.imag] for e in r["eigenvalues"]],
            "closed_form": None if r["closed_form"] is None else [[e.real, e.imag] for e in r["closed_form"]],
        }
        for r in rows
    ]
    write_file(out / "table.json", json.dumps(_json_safe(js), indent=1, allow_nan=False) + "\n")
    if not args.no_figure:
        figure(rows, out / "trajectories.png")
    print(md)
    print(
        f"wrote {out / 'table.md'}, {out / 'table.json'}" + ("" if args.no_figure else f", {out / 'trajectories.png'}")
    )
    return 0
