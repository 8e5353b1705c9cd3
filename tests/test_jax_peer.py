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


def test_the_jax_colab_step_is_the_main_jobs():
    """The colab variant against ODEStepper(coupling='decoupled', reg_at='after_step') with one batch for every
    stage: the main job's step (odegan train mog). float64 on both sides measured 4.8e-16 (5 steps, h 0.05,
    lambda 0.5): the same arithmetic; float32 rounding alone leaves ~2e-7."""
    assert jax_step.check_against_ours(0.1, 0.07, variant="colab") < 1e-6  # measured 9.9e-8
    assert jax_step.check_against_ours(0.05, 0.5, steps=5, variant="colab") < 1e-5  # measured 2.0e-7 (50x)
    assert jax_step.check_against_ours(0.05, 0.5, steps=5, variant="colab", peer_lam=0.5 * 1.01) > 2e-5  # 1.7e-4
    assert jax_step.check_against_ours(0.05, 0.5, steps=5, variant="colab", peer_lam=0.0) > 1e-3


def test_the_colab_step_is_not_the_joint_one():
    """With the same batch at every stage, the decoupled after-step step lands elsewhere than the joint
    first-stage one: the colab check above would catch a joint step."""
    import numpy as np

    from odegan_kernels.models import mog_pair

    gen = torch.Generator().manual_seed(2)
    D, G = mog_pair()
    real, z = torch.randn(256, 2, generator=gen), torch.randn(256, 32, generator=gen)
    _, colab, a = jax_step.setup(D, G, real, z, 0.05, 0.5, scan_steps=5, variant="colab")
    _, joint, b = jax_step.setup(D, G, real.expand(4, -1, -1), z.expand(4, -1, -1), 0.05, 0.5, scan_steps=5)
    colab(), joint()
    x, y = jax_step.flat_params(a["params"]), jax_step.flat_params(b["params"])
    assert np.isfinite(x).all() and np.abs(x - y).max() > 1e-3 * np.abs(x).max()  # measured 2.5e-3
    with pytest.raises(ValueError, match="variant must be one of"):
        jax_step.setup(D, G, real, z, 0.05, 0.5, variant="cifar")


def test_the_jax_runs_metrics_are_ours():
    """bench/jax_mog.py scores its samples as the trainer does (metrics.mode_metrics), on samples that cover some
    modes well and others not at all."""
    import numpy as np

    from bench import jax_mog
    from odegan_kernels.metrics import mode_metrics

    rng = np.random.default_rng(0)
    centres = np.array([[x, y] for x in jax_mog.GRID for y in jax_mog.GRID], np.float32)
    near = centres[rng.integers(0, 9, 3000)] + rng.normal(0, 0.03, (3000, 2))  # 9 modes, ~87% within 3 std
    samples = np.concatenate([near, rng.uniform(-2, 2, (2000, 2))]).astype(np.float32)
    ours = mode_metrics(torch.from_numpy(samples), torch.from_numpy(centres), jax_mog.STD)
    theirs = jax_mog.mode_metrics(samples, centres)
    assert theirs["modes"] == ours["modes"] and 9 <= ours["modes"] < 16
    assert abs(theirs["high_quality"] - ours["high_quality"]) < 1e-6 and 0.3 < ours["high_quality"] < 0.7


def test_the_vmap_of_the_colab_step_is_each_members_step():
    """jax.vmap of the colab step over a member axis (bench/population.py's jax_vmap rows) takes each member's own
    step, with its own h and lambda: member k lands where the unbatched step with h[k], lam[k] lands."""
    import numpy as np

    from odegan_kernels.models import mog_pair

    jax = jax_step.import_jax("cpu")
    jnp = jax.numpy
    pairs = [mog_pair(seed=s) for s in range(3)]
    hs, lams = [0.1, 0.05, 0.1], [0.07, 0.07, 0.5]
    gen = torch.Generator().manual_seed(3)
    real, z = torch.randn(3, 128, 2, generator=gen).numpy(), torch.randn(3, 128, 32, generator=gen).numpy()
    each = [jax_step.jax_params(D, G) for D, G in pairs]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *each)
    batched = jax.jit(jax.vmap(jax_step.colab_step_fn()))(stacked, real, z, jnp.array(hs), jnp.array(lams))
    ends = []
    for k in range(3):
        solo = jax.jit(jax_step.make_colab_step(hs[k], lams[k]))(each[k], real[k], z[k])
        mine = jax.tree_util.tree_map(lambda t, k=k: t[k], batched)
        x, y = jax_step.flat_params(mine), jax_step.flat_params(solo)
        assert np.abs(x - y).max() <= 1e-6 * np.abs(y).max()
        ends.append(x - jax_step.flat_params(each[k]))
    # the members moved, and differently (own start, data, h and lambda)
    assert min(np.abs(e).max() for e in ends) > 1e-4 and np.abs(ends[0] - ends[2]).max() > 1e-4


def test_a_jax_population_draws_each_members_own_data():
    """setup_population: two members from the same start, h and lambda end apart after one step (each drew its own
    batch inside JAX); the scan runs its steps."""
    import numpy as np

    from odegan_kernels.models import mog_pair

    D, G = mog_pair()
    once, many, state = jax_step.setup_population([(D, G), (D, G)], 0.1, 0.07, batch=64, scan_steps=3)
    start = jax_step.flat_params(jax_step.jax_params(D, G))
    once()
    a, b = (jax_step.flat_params([[(w[k], c[k]) for w, c in p] for p in state["params"]]) for k in (0, 1))
    assert np.isfinite(a).all() and np.abs(a - b).max() > 1e-5 and np.abs(a - start).max() > 1e-4
    many()
    assert np.isfinite(jax_step.flat_params([[(w[0], c[0]) for w, c in p] for p in state["params"]])).all()
