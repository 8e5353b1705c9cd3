"""The toy step's matrix products, counted and timed one by one (issue 21's "reason counted").

    python -m bench.step_products

torch.profiler records every product of one eager joint RK4 step of the toy pair (hand-derived engine, batch 512,
g_reg in the first stage: bench/step.py's ``ours_mlp`` row, whose products a compile="step" graph calls as they
are); each shape is then timed alone, with torch (this CPU's BLAS, MKL in the pinned wheels) and with numpy (its
OpenBLAS), on one thread. The sum is the step's product time at each library's rate: a floor under the compiled
step that no removal of dispatch can go below.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS on one thread, as torch's: before numpy loads

import collections  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from odegan_kernels import FlatParams, ODEStepper  # noqa: E402
from odegan_kernels.game import Batch, MLPPair  # noqa: E402
from odegan_kernels.models import mog_pair  # noqa: E402

PRODUCTS = ("aten::addmm", "aten::addmm_", "aten::mm", "aten::bmm", "aten::baddbmm")


def step_products(batch: int = 512) -> collections.Counter:
    """{(op, (m, k), (k, n)): calls} of one joint RK4 toy step."""
    gen = torch.Generator().manual_seed(0)
    D, G = mog_pair()
    real, z = torch.randn(4, batch, 2, generator=gen), torch.randn(4, batch, 32, generator=gen)
    flat = FlatParams(D=D, G=G)
    st = ODEStepper(flat, "rk4", h=0.01, reg=0.02, reg_at="first_stage", coupling="joint")
    eng = MLPPair(D, G)

    def closure(s):
        return eng(Batch(real[s.index], z[s.index]), s.players, s.penalties)

    for _ in range(3):
        st.step(closure)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        st.step(closure)
    found: collections.Counter = collections.Counter()
    for e in prof.events():
        if e.name in PRODUCTS:
            mats = [tuple(s) for s in e.input_shapes if len(s) == 2]
            a, b = (mats[-2], mats[-1]) if e.name.startswith("aten::addmm") else (mats[0], mats[1])
            found[(e.name, a, b)] += 1
    return found


def _us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main(argv=None) -> int:
    torch.set_num_threads(1)
    found = step_products()
    tot_t = tot_n = 0.0
    for (name, a, b), calls in sorted(found.items(), key=lambda kv: -kv[1]):
        x, y = torch.randn(*a), torch.randn(*b)
        xn, yn = x.numpy(), y.numpy()
        t_torch, t_numpy = _us(lambda: torch.mm(x, y)), _us(lambda: np.matmul(xn, yn))
        tot_t, tot_n = tot_t + calls * t_torch, tot_n + calls * t_numpy
        print(f"{name:13s} {a} x {b} x{calls}: torch {t_torch:6.1f} us, numpy {t_numpy:6.1f} us")
    print(f"{sum(found.values())} products a step: torch {tot_t / 1e3:.2f} ms, numpy {tot_n / 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
