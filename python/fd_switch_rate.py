"""How often g_reg's central difference (reg_method="finite_difference") crosses an activation switch of a ReLU pair.

    python python/fd_switch_rate.py              # the toy pair and the 8x8 DCGAN pair, float64
    python python/fd_switch_rate.py --calls 300  # fewer calls

Each call: a fresh pair (its seed) and a fresh z, g_reg's gradient by finite differences against the double backward
that defines it (game/g_reg.py), the relative error of the whole gradient. A call whose step crosses a switch of D's
or G's ReLU/LeakyReLU pattern errs by the jump times |g_phi| / eps, whatever eps: the rate, not the size, is what a
smaller step changes. docs/RESULTS.md ("Penalty variants") has the numbers.
"""

from __future__ import annotations

import argparse

import torch

from odegan_kernels.game.g_reg import g_reg_grad
from odegan_kernels.game.losses import g_loss
from odegan_kernels.models.dcgan import DCGANDiscriminator, DCGANGenerator
from odegan_kernels.models.mlp import mog_pair


def pair(name: str, seed: int):
    if name == "toy":
        return mog_pair(4, 16, seed=seed, dtype=torch.float64), 64, 4
    torch.manual_seed(seed)
    kw = dict(channels=1, image_size=8, width=4)
    return (DCGANDiscriminator(**kw).double(), DCGANGenerator(4, **kw).double()), 16, 4


def rate(name: str, calls: int, pairs: int = 10) -> str:
    errors = []
    for i in range(calls):
        (D, G), batch, z_dim = pair(name, i % pairs)
        z = torch.randn(batch, z_dim, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        grads = [g_reg_grad(D, G, lambda o: g_loss(o, "ns"), z, m) for m in ("double_backward", "finite_difference")]
        exact, fd = (torch.cat([t.flatten() for t in g]) for g in grads)
        errors.append(((fd - exact).norm() / exact.norm()).item())
    errors.sort()
    bad = sum(e > 1e-6 for e in errors)
    return (
        f"{name}: {bad}/{calls} calls off by more than 1e-6 ({100 * bad / calls:.1f}%), median "
        f"{errors[calls // 2]:.2g}, worst {errors[-1]:.3g} relative"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1500)
    args = ap.parse_args()
    for name in ("toy", "dcgan"):
        print(rate(name, args.calls if name == "toy" else max(args.calls // 6, 1)))


if __name__ == "__main__":
    main()
