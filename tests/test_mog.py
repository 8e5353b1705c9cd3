"""The 16-Gaussian mixture with the colab's settings: training improves the metrics on every seed used.

Seeds 0, 1 and 2, 4000 steps each (about 25 s each on one core). Measured at 4000 steps on these seeds:
high-quality fraction 0.046 / 0.028 / 0.025 (0.002-0.004 at initialisation), KL to uniform
0.34 / 0.68 / 0.39 (2.09-2.25 at initialisation), modes 6 / 2 / 2 (0 at initialisation). The thresholds
below hold for all three with a margin of about 2x. Which integrator wins is not asserted:
docs/RESULTS.md reports it over five seeds.
"""

import pytest

from odegan_kernels.trainer import Trainer, make_config


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_colab_settings_improve_every_metric(seed, tmp_path):
    cfg = make_config(
        "mog",
        seed=seed,
        steps=4000,
        eval_every=4000,
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
    assert after["high_quality"] >= 0.012, after
    assert after["kl"] <= 1.0 and after["kl"] < 0.5 * before["kl"], after
    assert after["modes"] >= 1, after
