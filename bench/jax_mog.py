"""The main job written as a JAX user would: the 16-Gaussian problem trained with the colab's RK4 step
(bench/jax_step.py's colab variant), batches drawn inside JAX, for bench/main_job_ab.py's whole-process A/B.

    python -m bench.jax_mog --steps 10000             # 100 steps per compiled call (lax.scan)
    python -m bench.jax_mog --steps 10000 --scan 1    # one jitted step per call

The same problem and settings as ``odegan train mog``: G and D MLPs with two hidden layers of 25 ReLU units, z in
R^32, truncated-normal init (2 sigma, sigma = 1/sqrt(fan_in), zero biases; JAX's random numbers, not torch's),
batch 512 of the mixture on the grid {-1.5, -0.5, 0.5, 1.5}^2 with std 0.02 (each mode 32 times, as the main job
draws it), one batch and one z per step, h 0.1, lambda 0.07. A host sync every ``--scan`` steps (the parameters'
largest magnitude, checked finite: the main job's log interval does the same every 100). At the end, as the main
job's last step: the evaluation (5120 samples from fixed latents: modes covered, high-quality fraction) and, with
``--plot``, a samples picture. No torch in this process. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from . import jax_step

STD, GRID = jax_step.MOG_STD, jax_step.MOG_GRID


def init_mlp(jax, key, dims: tuple[int, ...]):
    """[(W^T, b)] of a ReLU MLP with these widths, initialised as the references do (models/init.py)."""
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        key, k = jax.random.split(key)
        w = jax.random.truncated_normal(k, -2.0, 2.0, (a, b), dtype=jax.numpy.float32) / math.sqrt(a)
        layers.append((w, jax.numpy.zeros(b, jax.numpy.float32)))
    return layers


def mode_metrics(samples: np.ndarray, centres: np.ndarray, std: float = STD, min_count: int = 20) -> dict:
    """Modes covered and the high-quality fraction, as odegan_kernels.metrics.mode_metrics defines them."""
    dist = np.linalg.norm(samples[:, None, :] - centres[None], axis=-1)
    nearest, dmin = dist.argmin(1), dist.min(1)
    hq = dmin <= 3 * std
    counts = np.bincount(nearest[hq], minlength=len(centres))
    return {"modes": int((counts >= min_count).sum()), "high_quality": float(hq.mean())}


def main(argv=None) -> int:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--scan", type=int, default=100, help="steps per compiled call (1: one jitted step per call)")
    ap.add_argument("--seed", type=int, default=3, help="the mog preset's seed (JAX's streams: not torch's numbers)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--h", type=float, default=0.1)
    ap.add_argument("--reg", type=float, default=0.07)
    ap.add_argument("--eval-samples", type=int, default=5120)
    ap.add_argument("--plot", default=None, help="write the final samples picture here (PNG)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.scan < 1 or args.steps % args.scan:
        ap.error(f"--steps ({args.steps}) must be a positive multiple of --scan ({args.scan})")
    if args.batch < 16 or args.batch % 16:
        ap.error(f"--batch must be a positive multiple of 16 (each mode equally often), got {args.batch}")
    jax = jax_step.import_jax("cpu")
    jnp = jax.numpy
    centres = jnp.array([[x, y] for x in GRID for y in GRID], jnp.float32)
    step = jax_step.colab_step_fn("cpu")
    h, lam, batch = args.h, args.reg, args.batch

    @jax.jit
    def train(params, key):
        def body(p, k):
            real, z = jax_step.mog_draw(k, batch)
            return step(p, real, z, h, lam), None

        params = jax.lax.scan(body, params, jax.random.split(key, args.scan))[0]
        return params, jnp.max(jnp.array([jnp.max(jnp.abs(t)) for t in jax.tree_util.tree_leaves(params)]))

    key = jax.random.PRNGKey(args.seed)
    key, kd, kg, kfix = jax.random.split(key, 4)
    params = (init_mlp(jax, kd, (2, 25, 25, 1)), init_mlp(jax, kg, (32, 25, 25, 2)))
    fixed_z = jax.random.normal(kfix, (args.eval_samples, 32), jnp.float32)
    t0 = time.perf_counter()
    train = train.lower(params, key).compile()  # XLA's compile, timed apart from the steps
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps // args.scan):
        key, sub = jax.random.split(key)
        params, pmax = train(params, sub)
        if not math.isfinite(float(pmax)):  # the host sync of a log interval
            print(f"diverged: a parameter is {float(pmax)}", file=sys.stderr)
            return 1
    t_train = time.perf_counter() - t0
    mlp = jax_step.toy_game("cpu")[0]
    samples = np.asarray(jax.jit(mlp)(params[1], fixed_z))
    result = mode_metrics(samples, np.asarray(centres))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.4)
        ax.scatter(*np.asarray(centres).T, s=20, c="red", marker="x")
        ax.set(xlim=(-2.5, 2.5), ylim=(-2.5, 2.5), title=f"JAX colab RK4, step {args.steps}")
        fig.savefig(args.plot, dpi=100)
        plt.close(fig)
    out = {
        "steps": args.steps,
        "scan": args.scan,
        "compile_s": round(t_compile, 3),
        "train_s": round(t_train, 3),
        "steps_per_s": round(args.steps / t_train, 1),
        **result,
        "jax": jax.__version__,
        "process_s_so_far": round(time.perf_counter() - t_start, 3),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
