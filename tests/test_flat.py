import pytest
import torch
from torch import nn

from odegan_kernels import Batch, FlatParams, ODEStepper, game_gradients
from odegan_kernels.models import mog_pair


def test_views_segments_and_alignment():
    D, G = mog_pair()
    flat = FlatParams(D=D, G=G)
    assert flat.names == ["D", "G"]
    (d0, d1), (g0, g1) = flat.segments
    assert d0 == 0 and d1 == g0 and g1 == flat.numel
    base_p, base_g = flat.params.data_ptr(), flat.grads.data_ptr()
    for p in flat.parameters():
        assert (p.data_ptr() - base_p) % 16 == 0
        assert p.grad.data_ptr() - base_g == p.data_ptr() - base_p
    assert len(flat.parameters("D")) == len(list(D.parameters()))
    assert sum(p.numel() for p in flat.parameters()) <= flat.numel < sum(p.numel() for p in flat.parameters()) + 4 * 20


def test_values_preserved_and_writes_go_through():
    D, G = mog_pair(seed=3)
    before = [p.detach().clone() for p in list(D.parameters()) + list(G.parameters())]
    flat = FlatParams(D=D, G=G)
    for p, b in zip(flat.parameters(), before):
        assert torch.equal(p.detach(), b)
    flat.params.add_(1.0)
    for p, b in zip(flat.parameters(), before):
        assert torch.equal(p.detach(), b + 1)


def test_backward_accumulates_in_place_and_zero_grad():
    D, G = mog_pair()
    flat = FlatParams(D=D, G=G)
    x = torch.randn(8, 2)
    D(x).sum().backward()
    lo, hi = flat.segment("D")
    assert flat.grads[lo:hi].abs().sum() > 0
    assert flat.grads[hi:].abs().sum() == 0
    expected = [p.grad.clone() for p in D.parameters()]
    D(x).sum().backward()  # accumulates
    for p, e in zip(D.parameters(), expected):
        assert torch.allclose(p.grad, 2 * e)
    flat.check()
    flat.zero_grad()
    assert flat.grads.abs().sum() == 0
    # torch.optim-style set_to_none is repaired by zero_grad
    D.zero_grad(set_to_none=True)
    flat.zero_grad()
    flat.check()
    assert all(p.grad is not None for p in flat.parameters())


def test_state_dict_round_trip():
    D, G = mog_pair(seed=1)
    flat = FlatParams(D=D, G=G)
    sd = {k: v.clone() for k, v in D.state_dict().items()}
    flat.params.normal_()
    D.load_state_dict(sd)
    flat.check()
    for k, v in D.state_dict().items():
        assert torch.equal(v, sd[k])
    D2, _ = mog_pair(seed=7)
    D2.load_state_dict(D.state_dict())
    for a, b in zip(D2.parameters(), D.parameters()):
        assert torch.equal(a, b)


def test_error_shared_parameter():
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="shared with D"):
        FlatParams(D=nn.Sequential(shared), G=nn.Sequential(shared, nn.Linear(2, 1)))


def test_error_dtype():
    with pytest.raises(TypeError, match="torch.float64.*FlatParams holds torch.float32"):
        FlatParams(D=nn.Linear(2, 2).double(), G=nn.Linear(2, 2))
    flat = FlatParams([nn.Linear(2, 2).double(), nn.Linear(2, 2).double()], names=["D", "G"], dtype=torch.float64)
    assert flat.params.dtype == torch.float64


def test_error_devices():
    with pytest.raises(ValueError, match="move every player to one device"):
        FlatParams(D=nn.Linear(2, 2), G=nn.Linear(2, 2, device="meta"))


def test_error_empty_player():
    with pytest.raises(ValueError, match="no trainable parameters"):
        FlatParams(D=nn.Linear(2, 2), G=nn.ReLU())


def test_error_replaced_parameter():
    D, G = mog_pair()
    flat = FlatParams(D=D, G=G)
    D[0][0].weight = nn.Parameter(torch.zeros_like(D[0][0].weight))
    with pytest.raises(RuntimeError, match="was not flattened"):
        flat.check_modules(D, G)
    D, G = mog_pair()
    flat = FlatParams(D=D, G=G)
    D[0][0].weight.data = torch.zeros_like(D[0][0].weight)
    with pytest.raises(RuntimeError, match="no longer lives in the flat buffer"):
        flat.check()


@pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph")
def test_error_out_of_place_grad():
    D, G = mog_pair()
    flat = FlatParams(D=D, G=G)
    D(torch.randn(4, 2)).sum().backward(create_graph=True)
    with pytest.raises(RuntimeError, match="out-of-place"):
        flat.check()


def test_players_are_named_never_ordered():
    """Roles come from names: an unnamed list of two players is refused (which one is D?), keywords put D first."""
    D, G = mog_pair()
    with pytest.raises(TypeError, match="without names: which is the discriminator"):
        FlatParams([G, D])
    with pytest.raises(TypeError, match=r"FlatParams\(D, G\) is ambiguous"):
        FlatParams(D, G)
    flat = FlatParams(G=G, D=D)  # keyword order does not matter
    assert flat.names == ["D", "G"] and flat.parameters("D") == list(D.parameters())
    listed = FlatParams([G, D], names=["G", "D"])  # a player named D is player 0 whatever the list's order
    assert listed.names == ["D", "G"] and listed.segment("D")[0] == 0 and listed.parameters(0) == list(D.parameters())
    other = FlatParams([G, D], names=["x", "y"])  # other games keep their order: x is player 0
    assert other.parameters(0) == list(G.parameters())
    with pytest.raises(TypeError, match="not both"):
        FlatParams([D], D=D)
    with pytest.raises(ValueError, match="distinct"):
        FlatParams([D, G], names=["D", "D"])
    single = FlatParams([nn.Linear(2, 2)])  # one player needs no name
    assert single.names == ["player0"]


def test_reassigned_parameter_is_caught_at_the_next_step():
    """layer.weight = nn.Parameter(...) after flattening would never be trained: the next step says so."""
    D, G = mog_pair()
    st = ODEStepper(FlatParams(D=D, G=G), "euler", h=0.1)
    x, z = torch.randn(8, 2), torch.randn(8, 32)
    closure = lambda stage: game_gradients(D, G, Batch(x, z), players=stage.players)
    st.step(closure)
    D[0][0].weight = nn.Parameter(torch.zeros_like(D[0][0].weight))
    with pytest.raises(RuntimeError, match=r"parameter D\.0\.0\.weight was not flattened.*never be trained"):
        st.step(closure)


def test_edits_between_steps_are_honoured():
    """Writes to p.data or flat.params between steps are the next step's start, never undone."""
    D, G = mog_pair()
    flat = FlatParams(D=D, G=G)
    st = ODEStepper(flat, "euler", h=0.1)
    x, z = torch.randn(8, 2), torch.randn(8, 32)
    closure = lambda stage: game_gradients(D, G, Batch(x, z), players=stage.players)
    st.step(closure)
    for edit in (lambda: D[0][0].weight.data.mul_(0.5), lambda: flat.params.add_(0.01)):
        edit()
        start = flat.params.clone()
        st.step(closure)
        flat.zero_grad()
        game_gradients(D, G, Batch(x, z))  # the gradient at the new step's end point, for reference
        moved = flat.params - start
        flat.params.copy_(start)
        flat.zero_grad()
        game_gradients(D, G, Batch(x, z))
        assert torch.allclose(moved, -0.1 * flat.grads, atol=1e-7)  # an Euler step from the edited point
        flat.params.add_(moved)


def test_closure_that_assigns_grad_is_caught_at_that_stage():
    D, G = mog_pair()
    flat = FlatParams(D=D, G=G)
    st = ODEStepper(flat, "rk4", h=0.1)
    x, z = torch.randn(8, 2), torch.randn(8, 32)

    def assigning(stage):
        out = game_gradients(D, G, Batch(x, z), players=stage.players)
        if stage.index == 0:
            D[0][0].bias.grad = torch.ones_like(D[0][0].bias)  # moves nothing: the step reads the flat buffer
        return out

    before = flat.params.clone()
    with pytest.raises(RuntimeError, match=r"gradient of D\.0\.0\.bias was replaced.*p\.grad\.add_\(g\)"):
        st.step(assigning)
    assert torch.equal(flat.params, before)  # the failed step was rolled back

    def unsetting(stage):
        out = game_gradients(D, G, Batch(x, z), players=stage.players)
        G[0].weight.grad = None
        return out

    with pytest.raises(RuntimeError, match=r"gradient of G\.0\.weight was set to None"):
        st.step(unsetting)
    D.zero_grad(set_to_none=True)  # between steps this is harmless: the step re-attaches the gradients
    st.step(lambda stage: game_gradients(D, G, Batch(x, z), players=stage.players))
    assert all(p.grad is not None for p in flat.parameters())
