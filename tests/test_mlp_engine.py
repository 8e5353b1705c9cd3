"""The hand-derived gradient engine of a ReLU MLP pair (game/mlp.py) against the autograd engine, and the one
place an engine is chosen (game.choose_engine)."""

import itertools

import pytest
import torch
from torch import nn

from odegan_kernels import Batch, FlatParams, ODEStepper, PenaltyTerm, StageResult
from odegan_kernels.game import LOSSES, AutogradEngine, MLPPair, choose_engine, g_loss, g_reg_grad, game_gradients
from odegan_kernels.game.mlp import linear_layers, why_not
from odegan_kernels.models.dcgan import DCGANDiscriminator, DCGANGenerator
from odegan_kernels.models.mlp import mog_pair
from odegan_kernels.train import Trainer, make_config

CASES = [
    (loss, players, pen)
    for loss, players, pen in itertools.product(LOSSES, [(0, 1), (0,), (1,)], [False, True])
    if not (pen and 1 not in players)
]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def _pair(dtype, seed=1, hidden=25):
    D, G = mog_pair(hidden=hidden, seed=seed)
    return D.to(dtype), G.to(dtype)


def _batch(gen, n_real, n_z, dtype=torch.float64):
    return torch.randn(n_real, 2, generator=gen, dtype=dtype), torch.randn(n_z, 32, generator=gen, dtype=dtype)


def _rel(a, b):
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


def _poison_grads(params, gen):
    """Random starting .grad in float64: both sides must accumulate onto it (in float32 it starts at zero,
    where subtracting an O(1) start would cancel the digits under test)."""
    scale = 1.0 if params[0].dtype == torch.float64 else 0.0
    start = [scale * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    for p, s in zip(params, start):
        p.grad = s.clone()
    return start


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss,players,pen", CASES)
def test_equals_autograd(dtype, loss, players, pen):
    gen = torch.Generator().manual_seed(sum(map(ord, repr((loss, players, pen)))))
    D, G = _pair(dtype)
    params = [*D.parameters(), *G.parameters()]
    x, z = _batch(gen, 96, 80, dtype)  # unequal batches: each mean has its own size
    start = _poison_grads(params, gen)
    pens = ["g_reg"] if pen else []
    ref = game_gradients(D, G, Batch(x, z), loss, players, pens, zero_sum=False)
    want = [p.grad.clone() for p in params]
    if pen:
        want_reg = g_reg_grad(D, G, lambda logits: g_loss(logits, loss), z, "double_backward")
    for p, s in zip(params, start):
        p.grad = s.clone()
    out = MLPPair(D, G, loss)(Batch(x, z), players, pens)
    assert all(torch.isfinite(p.grad).all() for p in params)
    nd = len(list(D.parameters()))
    for player, idx in ((0, range(nd)), (1, range(nd, len(params)))):
        got = torch.cat([(params[i].grad - start[i]).flatten() for i in idx])
        ref_inc = torch.cat([(want[i] - start[i]).flatten() for i in idx])
        if player in players:  # one player's whole gradient: a tensor that cancels to ~0 has no relative error
            assert _rel(ref_inc, got) <= TOL[dtype]
        else:
            assert torch.equal(got, torch.zeros_like(got)) and torch.equal(ref_inc, got)
    for key in ("loss_d", "loss_g"):
        r, o = getattr(ref, key), getattr(out, key)
        assert (r is None) == (o is None)
        if r is not None:
            assert torch.allclose(r, o, rtol=TOL[dtype])
    assert torch.equal(out.fake, ref.fake) or _rel(ref.fake, out.fake) <= TOL[dtype]
    if pen:
        term = out.terms["g_reg"]
        assert term.players == (0,) and term.grad is not None and len(term.grad) == len(list(D.parameters()))
        for a, b in zip(want_reg, term.grad):
            assert torch.isfinite(b).all() and a.shape == b.shape
            assert _rel(a, b) <= TOL[dtype]
        assert torch.allclose(ref.value("g_reg"), term.value, rtol=TOL[dtype])
    else:
        assert out.terms == {} == ref.terms


def test_reused_fakes_and_no_values():
    D, G = _pair(torch.float64)
    gen = torch.Generator().manual_seed(0)
    x, z = _batch(gen, 64, 64)
    fake = G(z).detach()
    pair = MLPPair(D, G)
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    out = pair(Batch(x, z, fake=fake + 1.0), players=(0,), losses=False)
    assert (out.loss_d, out.loss_g, out.terms) == (None, None, {})
    assert torch.equal(out.fake, fake + 1.0)
    with_given = flat.grads.clone()
    flat.zero_grad()
    game_gradients(D, G, Batch(x, z, fake=fake + 1.0), players=(0,))
    assert _rel(flat.grads, with_given) <= 1e-12
    with pytest.raises(ValueError, match="batch.fake can only be reused"):
        pair(Batch(x, z, fake=fake), players=(0, 1))
    with pytest.raises(ValueError, match="g_reg needs the generator's gradient"):
        pair(Batch(x, z), players=(0,), penalties=["g_reg"])


def test_what_is_recognised():
    D, G = mog_pair()
    assert [lin.out_features for lin in linear_layers(D)] == [25, 25, 1]
    assert [lin.out_features for lin in linear_layers(G)] == [25, 25, 2]
    assert why_not(D, G, "ns") is None
    assert "not plain ReLU MLPs" in why_not(DCGANDiscriminator(), DCGANGenerator(), "ns")
    tanh_d = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    assert "not plain ReLU MLPs" in why_not(tanh_d, G, "ns")
    no_bias = nn.Sequential(nn.Linear(2, 8, bias=False), nn.ReLU(), nn.Linear(8, 1))
    assert "not plain ReLU MLPs" in why_not(no_bias, G, "ns")
    assert "end in Squeeze" in why_not(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1)), G, "ns")
    hooked_d, _ = mog_pair()
    hooked_d[0][2].register_forward_hook(lambda *a: None)
    assert "not plain ReLU MLPs" in why_not(hooked_d, G, "ns")
    frozen_d, _ = mog_pair()
    frozen_d[0][0].bias.requires_grad_(False)
    assert "frozen" in why_not(frozen_d, G, "ns")
    assert "autocast" in why_not(D, G, "ns", autocast=True)
    assert "conditional" in why_not(D, G, "ns", conditional=True)
    assert "gradient penalties ('r1',)" in why_not(D, G, "ns", penalties=("r1", "g_reg"))
    assert why_not(D, G, "ns", penalties=("g_reg",)) is None
    assert "approximation" in why_not(D, G, "ns", "finite_difference")
    assert why_not(D, G, "ns", "jvp") is None
    with pytest.raises(ValueError, match="cannot run here: the players are not plain ReLU MLPs"):
        MLPPair(tanh_d, G)


def test_game_gradients_engine_switch():
    D, G = _pair(torch.float64)
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x, z = _batch(gen, 64, 64)
    results = {}
    for engine in ("autograd", "mlp", "auto"):
        flat.zero_grad()
        out = game_gradients(D, G, Batch(x, z), penalties=["g_reg"], reg_method="jvp", engine=engine)
        results[engine] = (flat.grads.clone(), out)
    assert results["mlp"][1].terms["g_reg"].grad is not None and results["auto"][1].terms["g_reg"].grad is not None
    assert _rel(results["autograd"][0], results["mlp"][0]) <= 1e-12
    for a, b in zip(results["autograd"][1].terms["g_reg"].grad, results["mlp"][1].terms["g_reg"].grad):
        assert _rel(a, b) <= 1e-12
    # where the pair is not supported, auto falls back to autograd and mlp says why
    flat.zero_grad()
    out = game_gradients(D, G, Batch(x, z), penalties=["g_reg"], reg_method="finite_difference", engine="auto")
    assert out.terms["g_reg"].grad is not None and torch.isfinite(flat.grads).all()
    with pytest.raises(ValueError, match="engine='mlp' cannot run here: reg_method='finite_difference'"):
        game_gradients(D, G, Batch(x, z), penalties=["g_reg"], reg_method="finite_difference", engine="mlp")
    with pytest.raises(ValueError, match="engine must be one of"):
        game_gradients(D, G, Batch(x, z), engine="fast")


def test_the_engine_is_chosen_in_one_place_and_says_why():
    D, G = mog_pair()
    engine, why = choose_engine(D, G, "auto")
    assert isinstance(engine, MLPPair) and why is None
    engine, why = choose_engine(D, G, "auto", penalties=["r1"])
    assert isinstance(engine, AutogradEngine) and "gradient penalties ('r1',)" in why
    engine, why = choose_engine(D, G, "auto", capture=True)
    assert isinstance(engine, AutogradEngine) and "cuda_graph" in why
    engine, why = choose_engine(D, G, "autograd")
    assert isinstance(engine, AutogradEngine) and "asked for" in why


@pytest.mark.parametrize("preset", ["mog", "mog-joint"])
def test_stepper_with_hand_derived_gradients_follows_autograd(preset, tmp_path):
    """Both presets' RK4 steps (after-step and first-stage penalty) agree with the autograd engine."""
    runs = {}
    for grads in ("autograd", "mlp"):
        tr = Trainer(make_config(preset, grads=grads, out=str(tmp_path / grads), progress=False))
        assert tr.game_closure.engine.name == grads
        stats = [tr.train_step() for _ in range(10)]
        runs[grads] = (tr.flat.params.clone(), stats[0])
    a, b = runs["autograd"], runs["mlp"]
    # measured: 2e-8 (float rounding; another stage backend differs as much); lambda 1% off gives 7e-5
    assert _rel(a[0], b[0]) <= 1e-6
    assert set(a[1]) == set(b[1]) == {"loss_d", "loss_g", "g_reg"}
    for key in a[1]:
        assert torch.allclose(a[1][key], b[1][key], rtol=1e-5)


def test_trainer_engine_choice(tmp_path):
    assert Trainer(make_config("mog", out=str(tmp_path), progress=False)).game_closure.engine.name == "mlp"  # auto
    tr = Trainer(make_config("mog", reg_method="finite_difference", out=str(tmp_path), progress=False))
    assert tr.game_closure.engine.name == "autograd"
    with pytest.raises(ValueError, match="grads='mlp' cannot run here: reg_method='finite_difference'"):
        Trainer(make_config("mog", grads="mlp", reg_method="finite_difference", out=str(tmp_path)))
    with pytest.raises(ValueError, match="grads must be one of"):
        make_config("mog", grads="fast")


def test_adam_baseline_takes_a_given_penalty_gradient(tmp_path):
    """The Adam/SGD baseline with the regulariser: a penalty given as its gradient (hand-derived or jvp)
    moves D exactly as the double backward does."""
    results = {}
    for grads, method in (("autograd", "double_backward"), ("autograd", "jvp"), ("mlp", "double_backward")):
        tr = Trainer(
            make_config("mog-adam", reg=0.5, grads=grads, reg_method=method, out=str(tmp_path), progress=False)
        )
        for _ in range(3):
            stats = tr.train_step()
        assert set(stats) == {"loss_d", "loss_g", "g_reg"} and stats["g_reg"].grad_fn is None
        results[(grads, method)] = tr.flat.params.clone()
    ref = results[("autograd", "double_backward")]
    for key, params in results.items():
        assert _rel(ref, params) <= 1e-5, key


def test_stepper_refuses_a_wrongly_shaped_penalty_gradient():
    D, G = mog_pair()
    st = ODEStepper(FlatParams(D=D, G=G), "euler", h=0.1, reg=0.1, reg_at="after_step")
    wrong = StageResult(terms={"g_reg": PenaltyTerm((0,), torch.zeros(()), [torch.zeros(3)])})
    with pytest.raises(ValueError, match="one tensor per parameter of the regularised player"):
        st.step(lambda stage: wrong)


def test_the_structure_is_checked_on_every_call_of_game_gradients():
    D, G = mog_pair()
    x, z = torch.randn(8, 2), torch.randn(8, 32)
    FlatParams(D=D, G=G)
    assert game_gradients(D, G, Batch(x, z), engine="mlp").loss_d is not None
    handle = D[0][0].register_forward_pre_hook(lambda *a: None)  # a hook added later: autograd runs it
    with pytest.raises(ValueError, match="engine='mlp' cannot run here: the players are not plain ReLU MLPs"):
        game_gradients(D, G, Batch(x, z), engine="mlp")
    handle.remove()
    D[0][4] = nn.Linear(25, 1)  # a new last layer: the engine built for the call uses it
    engine, _ = choose_engine(D, G)
    assert engine.d_layers[-1] is D[0][4]
