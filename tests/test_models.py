"""The image models: shapes, the references' initialisation, and one ODE step through each pair."""

import math

import pytest
import torch
from torch import nn

from odegan_kernels import FlatParams, ODEStepper, game_gradients
from odegan_kernels.models import DCGANDiscriminator, DCGANGenerator, ResNetDiscriminator, ResNetGenerator

PAIRS = {"dcgan": (DCGANDiscriminator, DCGANGenerator), "resnet": (ResNetDiscriminator, ResNetGenerator)}


@pytest.mark.parametrize("arch", sorted(PAIRS))
def test_shapes_init_and_one_rk4_step(arch):
    torch.manual_seed(0)
    Dcls, Gcls = PAIRS[arch]
    D, G = Dcls(), Gcls(z_dim=128)
    z = torch.randn(4, 128)
    x = G(z)
    assert x.shape == (4, 3, 32, 32) and x.abs().max() <= 1
    assert D(x).shape == (4,)
    assert D(x).abs().max() < 5  # logits of order one at initialisation (no spectral norm to tame them)
    for m in list(D.modules()) + list(G.modules()):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            fan_in = (
                m.weight.shape[0] * m.weight[0, 0].numel() if isinstance(m, nn.ConvTranspose2d) else m.weight[0].numel()
            )
            std = 1 / math.sqrt(fan_in)
            assert m.weight.abs().max() <= 2 * std + 1e-7  # truncated at 2 sigma
            assert m.bias is None or m.bias.abs().max() == 0
    flat = FlatParams([D, G])
    st = ODEStepper(flat, "rk4", h=0.04, reg=0.02)
    real = torch.rand(4, 4, 3, 32, 32) * 2 - 1
    zs = torch.randn(4, 4, 128)
    before = flat.params.clone()
    out = st.step(lambda s: game_gradients(D, G, real[s.index], zs[s.index], players=s.players, penalty=s.penalty))
    assert torch.isfinite(flat.params).all() and not torch.equal(flat.params, before)
    assert torch.isfinite(out["penalty"]) and out["penalty"] > 0
