"""The 16-Gaussian mixture with the colab's settings: training improves the metrics on every seed used.

Seeds 0, 1 and 2, 6000 steps each (about 22 s each on one core). Measured at 6000 steps on these seeds
with the default (hand-derived) gradients: high-quality fraction 0.12 / 0.069 / 0.050 (0.002-0.004 at
initialisation), KL to uniform 0.86 / 0.71 / 1.04 (2.25 / 2.15 / 2.09 at initialisation, so 0.38 / 0.33 /
0.50 of it), modes 6 / 5 / 2 (0 at initialisation). Early training is chaotic: float rounding alone (the
autograd engine, another stage backend) moves these numbers, e.g. seed 2 through autograd: 0.058, 0.88,
3 modes; at 4000 steps seed 2 had covered no mode in one engine and 4 in the other. Hence 6000 steps and
thresholds with a margin of 1.5-2.5x on the worst seed. Which integrator wins is not asserted:
docs/RESULTS.md reports it over five seeds.
"""

import pytest

from odegan_kernels.train import Trainer, make_config


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_colab_settings_improve_every_metric(seed, tmp_path):
    cfg = make_config(
        "mog",
        seed=seed,
        steps=6000,
        eval_every=6000,
        log_every=500,
        plot_every=10**9,
        ckpt_every=10**9,
        ckpt_minutes=1e9,
        out=str(tmp_path),
        progress=False,
    )
    tr = Trainer(cfg)
    before = tr.evaluate()
    after = tr.run()
    assert before["modes"] == 0 and before["high_quality"] < 0.005
    assert after["finite"]
    assert after["high_quality"] >= 0.02, after
    assert after["kl"] <= 0.75 * before["kl"], after
    assert after["modes"] >= 1, after
