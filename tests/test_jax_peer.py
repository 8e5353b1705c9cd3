"""bench/jax_step.py, the JAX peer of bench/step.py: it must take the same step as ours, or its timing compares
nothing. Needs jax (in the [dev] extra; an optional benchmark dependency, never the package's)."""

import pytest
import torch

from bench import jax_step
from bench.step import LAM, H

# jax_step sets jax's environment up before its first import: importorskip would import it first
pytestmark = pytest.mark.skipif(
    not jax_step.available(), reason="the JAX peer needs jax: pip install 'jax[cpu]' (the [dev] extra has it)"
)


def test_the_jax_step_is_ours():
    assert jax_step.check_against_ours(H, LAM) < 1e-6  # measured 1.2e-8 (float32 rounding)
    # stronger regulariser and step, where a wrong penalty or stage weight would show at once
    assert jax_step.check_against_ours(0.05, 0.5, steps=5) < 1e-5


def test_the_check_can_fail():
    assert jax_step.check_against_ours(0.05, 0.5, steps=5, peer_lam=0.5 * 1.01) > 1e-4
    assert jax_step.check_against_ours(0.05, 0.5, steps=5, peer_lam=0.0) > 1e-3


def test_scan_runs_the_steps_it_says():
    """lax.scan of n steps lands where n single jitted steps land."""
    import numpy as np

    from odegan_kernels.models import mog_pair

    gen = torch.Generator().manual_seed(1)
    D, G = mog_pair()
    real, z = torch.randn(4, 64, 2, generator=gen), torch.randn(4, 64, 32, generator=gen)
    once, _, a = jax_step.setup(D, G, real, z, 0.05, 0.1, scan_steps=7)
    _, many, b = jax_step.setup(D, G, real, z, 0.05, 0.1, scan_steps=7)
    for _ in range(7):
        once()
    many()
    x, y = jax_step.flat_params(a["params"]), jax_step.flat_params(b["params"])
    assert np.isfinite(x).all() and np.abs(x - y).max() <= 1e-5 * np.abs(x).max()
    assert np.abs(x - jax_step.flat_params(jax_step.setup(D, G, real, z, 0.05, 0.1)[2]["params"])).max() > 1e-4


def test_only_plain_relu_mlps():
    with pytest.raises(ValueError, match="plain ReLU MLPs"):
        jax_step.linear_layers(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)))
    with pytest.raises(ValueError, match="with a bias"):
        jax_step.linear_layers(torch.nn.Linear(2, 3, bias=False))
