"""r1, r2 and WGAN-GP by finite differences (gp_method="finite_difference", issue 21): each penalty's gradient w.r.t.
D's parameters by a central difference along the input gradient, first-order passes only, against the double
backward that defines it (float64, fresh random inputs); the players then compile (no create_graph anywhere); what
it cannot do (float32, autocast, consensus, populations) is refused in one line."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from odegan_kernels import FlatParams, ODEStepper
from odegan_kernels.contract import apply_penalties
from odegan_kernels.game import AutogradEngine, Batch
from odegan_kernels.game.compiled import compile_engine
from odegan_kernels.models.dcgan import DCGANDiscriminator, DCGANGenerator
from odegan_kernels.models.mlp import mog_pair
from odegan_kernels.train.config import Config, make_config

from .bounds import NUDGE_MARGIN

# Measured here (seeds 0-2): 1e-10 to 3e-10 relative. The bound: the difference's rounding, machine eps over the step
# (2.2e-16 / 6e-6 ~ 4e-11), times the cancellation of a sum over the batch (~10-100): 1e-8, ~30x the measured.
FD_TOL = 1e-8
PENALTIES = ("r1", "r2", "wgan_gp")


def pairs():
    torch.manual_seed(0)
    with torch.device("cpu"):
        mog = [m.double() for m in mog_pair(4, 16, seed=0)]
        dcgan = (
            DCGANDiscriminator(channels=1, image_size=8, width=4).double(),
            DCGANGenerator(4, channels=1, image_size=8, width=4).double(),
        )
    return {"mog": (mog, (2,)), "dcgan": (dcgan, (1, 8, 8))}


def penalty_grad(D, G, method: str, name: str, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(D's gradient of the penalty alone, its value) through the optimisers' one path (apply_penalties)."""
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    out = AutogradEngine(D, G, "ns", gp_method=method)(batch, (0,), [name])
    flat.zero_grad()
    values = apply_penalties(out, flat, {name: 1.0}, (0,))
    return flat.player_grads(0).clone(), values[name]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pair", ["mog", "dcgan"])
def test_the_finite_difference_matches_the_double_backward(pair, seed):
    (D, G), shape = pairs()[pair]
    gen = torch.Generator().manual_seed(seed)
    n = 64 if pair == "mog" else 16
    batch = Batch(
        torch.rand(n, *shape, generator=gen, dtype=torch.float64) * 4 - 2,
        torch.randn(n, 4, generator=gen, dtype=torch.float64),
        mix=torch.rand(n, generator=gen, dtype=torch.float64),
    )
    for name in PENALTIES:
        exact, v_exact = penalty_grad(D, G, "double_backward", name, batch)
        fd, v_fd = penalty_grad(D, G, "finite_difference", name, batch)
        assert torch.isfinite(fd).all() and exact.norm() > 0, name
        rel = ((fd - exact).norm() / exact.norm()).item()
        assert rel <= FD_TOL, f"{pair} {name}: {rel:.3g} relative"
        assert v_fd.item() == pytest.approx(v_exact.item(), rel=1e-13), name


@pytest.mark.slow  # a cold compile of a conv pair: a minute on 2 cores
def test_the_players_compile_with_every_input_penalty_by_finite_differences():
    """A conv pair (DCGAN, BatchNorm in G), RK4 joint with r1, r2 and WGAN-GP by finite differences and g_reg by its
    own: the players compile (compile_engine gives no reason) and the run follows the eager one within the nudge's
    tolerance; nothing recompiles after the first step. With consensus, or by double backward, it says why not."""
    gen = torch.Generator().manual_seed(4)
    data = [
        (torch.rand(8, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1,
         torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.rand(8, generator=gen, dtype=torch.float64))
        for _ in range(3)
    ]  # fmt: skip
    pens = {"r1": 0.5, "r2": 0.2, "wgan_gp": 0.1}

    def run(compiled, nudge=False):
        (D, G), _ = pairs()["dcgan"]
        flat = FlatParams(D=D, G=G, dtype=torch.float64)
        if nudge:
            with torch.no_grad():
                flat.params.copy_(torch.nextafter(flat.params, torch.full_like(flat.params, float("inf"))))
        eng = AutogradEngine(D, G, reg_method="finite_difference", gp_method="finite_difference")
        if compiled:
            eng, why = compile_engine(eng, [*pens, "g_reg"])
            assert why is None and eng.name == "autograd+compile"
        st = ODEStepper(flat, "rk4", h=0.05, reg=0.1, penalties=pens, coupling="joint", backend="foreach")
        graphs = []
        for x, z, mix in data:
            st.step(lambda stage, x=x, z=z, m=mix: eng(Batch(x, z, mix=m), stage.players, stage.penalties))
            graphs.append(counters["stats"]["unique_graphs"])
        return flat.params.clone(), graphs

    eager, _ = run(False)
    nudged, _ = run(False, nudge=True)
    compiled, graphs = run(True)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert torch.isfinite(compiled).all() and rel(eager, run(False)[0]) == 0
    assert graphs[0] > 0 and graphs[1:] == [graphs[0]] * 2, graphs
    assert rel(compiled, eager) <= NUDGE_MARGIN * max(rel(nudged, eager), 1e-15), rel(compiled, eager)
    (D, G), _ = pairs()["dcgan"]
    fd = AutogradEngine(D, G, reg_method="finite_difference", gp_method="finite_difference")
    _, why = compile_engine(fd, ["r1", "consensus"])
    assert "('consensus',) differentiate a gradient" in why
    _, why = compile_engine(AutogradEngine(D, G, reg_method="finite_difference"), ["r1"])
    assert "gp_method=finite_difference takes them by first-order passes" in why


def test_what_it_cannot_do_is_refused_in_one_line():
    (D, G), _ = pairs()["mog"]
    D32, G32 = mog_pair(4, 16, seed=0)
    gen = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(8, 2, generator=gen), torch.randn(8, 4, generator=gen))
    with pytest.raises(ValueError, match="needs float64 inputs and parameters, got torch.float32"):
        AutogradEngine(D32, G32, gp_method="finite_difference")(batch, (0,), ["r1"])
    with pytest.raises(ValueError, match="needs full-precision passes"):
        AutogradEngine(D, G, gp_method="finite_difference", autocast=True)
    with pytest.raises(ValueError, match="gp_method .* must be one of"):
        AutogradEngine(D, G, gp_method="jvp")
    for opts, match in (
        (dict(dtype="float64"), "differentiates r1, r2 and wgan_gp; this run has none"),
        (dict(r1=0.3), "needs dtype float64 without autocast"),
    ):
        with pytest.raises(ValueError, match=match) as err:
            make_config("mog", gp_method="finite_difference", **opts)
        assert "\n" not in str(err.value)
    from odegan_kernels.train.population import Population

    cfgs = [Config(problem="mog", dtype="float64", r1=0.3, gp_method="finite_difference", seed=s) for s in (0, 1)]
    with pytest.raises(ValueError, match="penalties by double backward only"):
        Population(cfgs)


def test_a_run_with_finite_difference_penalties_trains(tmp_path):
    """The trainer's option: the mog preset in float64 with r1 and WGAN-GP by finite differences follows the same
    run by double backward closely (the gradients agree to ~1e-10; 20 steps of a chaotic game amplify it)."""
    from odegan_kernels.train import Trainer

    opts = dict(dtype="float64", r1=0.3, wgan_gp=0.1, steps=20, progress=False, hidden=8, batch=64, eval_every=10**6)
    a = Trainer(make_config("mog", out=str(tmp_path / "fd"), gp_method="finite_difference", **opts))
    b = Trainer(make_config("mog", out=str(tmp_path / "db"), **opts))
    for _ in range(20):
        a.train_step(), b.train_step()
    assert a.game_closure.engine.gp_method == "finite_difference"
    rel = float((a.flat.params - b.flat.params).norm() / b.flat.params.norm())
    assert 0 < rel <= 1e-6, rel
