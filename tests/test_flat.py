import pytest
import torch
from torch import nn

from odegan_kernels import FlatParams
from odegan_kernels.models import mog_pair


def test_views_segments_and_alignment():
    D, G = mog_pair()
    flat = FlatParams([D, G])
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
    flat = FlatParams([D, G])
    for p, b in zip(flat.parameters(), before):
        assert torch.equal(p.detach(), b)
    flat.params.add_(1.0)
    for p, b in zip(flat.parameters(), before):
        assert torch.equal(p.detach(), b + 1)


def test_backward_accumulates_in_place_and_zero_grad():
    D, G = mog_pair()
    flat = FlatParams([D, G])
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
    flat = FlatParams([D, G])
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
        FlatParams([nn.Sequential(shared), nn.Sequential(shared, nn.Linear(2, 1))])


def test_error_dtype():
    with pytest.raises(TypeError, match="torch.float64.*FlatParams holds torch.float32"):
        FlatParams([nn.Linear(2, 2).double(), nn.Linear(2, 2)])
    flat = FlatParams([nn.Linear(2, 2).double(), nn.Linear(2, 2).double()], dtype=torch.float64)
    assert flat.params.dtype == torch.float64


def test_error_devices():
    with pytest.raises(ValueError, match="move every player to one device"):
        FlatParams([nn.Linear(2, 2), nn.Linear(2, 2, device="meta")])


def test_error_empty_player():
    with pytest.raises(ValueError, match="no trainable parameters"):
        FlatParams([nn.Linear(2, 2), nn.ReLU()])


def test_error_replaced_parameter():
    D, G = mog_pair()
    flat = FlatParams([D, G])
    D[0][0].weight = nn.Parameter(torch.zeros_like(D[0][0].weight))
    with pytest.raises(RuntimeError, match="was not flattened"):
        flat.check_modules(D, G)
    D, G = mog_pair()
    flat = FlatParams([D, G])
    D[0][0].weight.data = torch.zeros_like(D[0][0].weight)
    with pytest.raises(RuntimeError, match="no longer lives in the flat buffer"):
        flat.check()


@pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph")
def test_error_out_of_place_grad():
    D, G = mog_pair()
    flat = FlatParams([D, G])
    D(torch.randn(4, 2)).sum().backward(create_graph=True)
    with pytest.raises(RuntimeError, match="out-of-place"):
        flat.check()
