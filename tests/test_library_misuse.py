"""The library's edges that a hostile test found silent or wrong (issue 18, items 7-11): each is refused with a
message that names it, or works as documented."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from odegan_kernels import Batch, FlatParams, ODEStepper, game_gradients
from odegan_kernels.game import MLPPair
from odegan_kernels.models import mog_pair
from odegan_kernels.train.baselines import BaselineOptimizer


def _toy(seed=0):
    D, G = mog_pair(z_dim=4, hidden=8, seed=seed)
    flat = FlatParams(D=D, G=G)
    gen = torch.Generator().manual_seed(seed)
    x, z = torch.randn(16, 2, generator=gen), torch.randn(16, 4, generator=gen)
    return D, G, flat, x, z


def _closure(D, G, x, z):
    return lambda stage: game_gradients(D, G, Batch(x, z), "ns", stage.players, stage.penalties)


@pytest.mark.parametrize("make", [lambda f: ODEStepper(f, "rk4", h=0.1), lambda f: BaselineOptimizer(f, "sgd", lr=0.1)])
def test_a_closure_that_steps_its_own_optimiser_is_refused(make):
    D, G, flat, x, z = _toy()
    opt = make(flat)
    inner = _closure(D, G, x, z)

    def reentrant(stage):
        opt.step(inner)  # a second step inside the first
        return inner(stage)

    before = flat.params.clone()
    with pytest.raises(RuntimeError, match="in the middle of a step already .*a closure that calls step"):
        opt.step(reentrant)
    assert torch.equal(flat.params, before) and opt.steps == 0
    opt.step(inner)  # and the optimiser is usable after it
    assert opt.steps == 1


def test_a_parameter_moved_out_of_the_buffer_mid_step_stops_that_step():
    D, G, flat, x, z = _toy()
    st = ODEStepper(flat, "rk4", h=0.1)
    inner = _closure(D, G, x, z)
    calls = []

    def moving(stage):
        calls.append(stage.index)
        out = inner(stage)
        if stage.index == 1:
            w = D[0][0].weight
            w.data = w.data.clone()  # now outside the flat buffer: the stage op would never see it
        return out

    with pytest.raises(
        RuntimeError, match=r"parameter D\.0\.0\.weight was moved out of the flat buffer during the step"
    ):
        st.step(moving)
    assert calls == [0, 1] and st.steps == 0  # caught at the call that moved it, before its stage op


@pytest.mark.parametrize("engine", ["autograd", "mlp"])
def test_game_gradients_refuse_what_would_do_nothing_or_crash(engine):
    D, G, flat, x, z = _toy()
    for players in [(), (2,), (0, 0), (True,)]:
        with pytest.raises(ValueError, match="players must name D \\(0\\), G \\(1\\) or both"):
            game_gradients(D, G, Batch(x, z), players=players, engine=engine)
    with pytest.raises(ValueError, match="Batch.real is empty"):
        game_gradients(D, G, Batch(x[:0], z), engine=engine)
    with pytest.raises(ValueError, match="Batch.z is empty"):
        Batch(x, z[:0])
    with pytest.raises(TypeError, match="Batch.real must be a tensor, got list"):
        Batch(x.tolist(), z)
    with pytest.raises(TypeError, match="takes a game.Batch, got Tensor"):
        MLPPair(D, G)(x, z) if engine == "mlp" else game_gradients(D, G, x)


def test_g_reg_on_players_without_gradients_yet():
    """Players outside any FlatParams start with p.grad None: the gradients are created, g_reg comes back."""
    D, G = mog_pair(z_dim=4, hidden=8)
    x, z = torch.randn(16, 2), torch.randn(16, 4)
    for method in ("double_backward", "jvp", "finite_difference"):
        for p in [*D.parameters(), *G.parameters()]:
            p.grad = None
        out = game_gradients(D, G, Batch(x, z), penalties=["g_reg"], reg_method=method)
        assert all(p.grad is not None for p in G.parameters()) and torch.isfinite(out.value("g_reg"))


def test_an_empty_parameter_is_carried_along():
    D, G = mog_pair(z_dim=4, hidden=8)
    D.empty = nn.Parameter(torch.zeros(0))
    flat = FlatParams(D=D, G=G)
    st = ODEStepper(flat, "rk4", h=0.1, reg=0.1)
    x, z = torch.randn(16, 2), torch.randn(16, 4)
    before = flat.params.clone()
    for _ in range(2):
        st.step(_closure(D, G, x, z))
    assert D.empty.shape == (0,) and not torch.equal(flat.params, before)


def test_two_optimisers_may_take_turns_but_never_overlap():
    """Sharing one FlatParams: each step starts from the parameters as they are, so optimisers may take turns (each
    counts its own steps); a step while another is running (another thread) is refused."""
    D, G, flat, x, z = _toy()
    a, b = ODEStepper(flat, "rk4", h=0.1), ODEStepper(flat, "euler", h=0.05)
    cl = _closure(D, G, x, z)
    a.step(cl)
    after_a = flat.params.clone()
    b.step(cl)
    D2, G2, flat2, _, _ = _toy()
    with torch.no_grad():
        flat2.params.copy_(after_a)
    ODEStepper(flat2, "euler", h=0.05).step(_closure(D2, G2, x, z))
    assert torch.equal(flat.params, flat2.params) and (a.steps, b.steps) == (1, 1)

    inside, release, errors = threading.Event(), threading.Event(), []

    def slow(stage):
        inside.set()
        release.wait(10)
        return cl(stage)

    t = threading.Thread(target=lambda: a.step(slow))
    t.start()
    assert inside.wait(10)
    try:
        b.step(cl)
    except RuntimeError as exc:
        errors.append(str(exc))
    release.set()
    t.join(10)
    assert errors and "another optimiser or thread" in errors[0]
    assert a.steps == 2 and b.steps == 1
