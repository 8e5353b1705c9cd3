"""The image models: shapes, the references' initialisation, and one ODE step through each pair."""

import math

import pytest
import torch
from torch import nn

from odegan_kernels import Batch, FlatParams, ODEStepper, game_gradients
from odegan_kernels.models import (
    ConditionalResNetDiscriminator,
    ConditionalResNetGenerator,
    DCGANDiscriminator,
    DCGANGenerator,
    ResNetDiscriminator,
    ResNetGenerator,
)

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
    flat = FlatParams(D=D, G=G)
    st = ODEStepper(flat, "rk4", h=0.04, reg=0.02)
    real = torch.rand(4, 4, 3, 32, 32) * 2 - 1
    zs = torch.randn(4, 4, 128)
    before = flat.params.clone()
    out = st.step(lambda s: game_gradients(D, G, Batch(real[s.index], zs[s.index]), "ns", s.players, s.penalties))
    assert torch.isfinite(flat.params).all() and not torch.equal(flat.params, before)
    assert torch.isfinite(out.value("g_reg")) and out.value("g_reg") > 0


def _convs(module):
    return [(m.out_channels, m.kernel_size[0], m.stride[0]) for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_dcgan_at_other_sizes():
    """The reference DCGAN at 32x32 (DESIGN.md's layer list), and the same pair at other powers of two: one
    transposed-conv block per doubling from 4x4, the last ``width`` wide; a (3x3 s1, 4x4 s2) pair of D's convs per
    halving; 16x16 (the digits preset's) drops the first block and the last pair."""
    D, G = DCGANDiscriminator(), DCGANGenerator()
    assert _convs(D) == [(64, 3, 1), (64, 4, 2), (128, 3, 1), (128, 4, 2), (256, 3, 1), (256, 4, 2), (512, 3, 1)]
    assert [m.out_channels for m in G.modules() if isinstance(m, nn.ConvTranspose2d)] == [256, 128, 64]
    assert G.fc.out_features == 4 * 4 * 512 and D.fc.in_features == 4 * 4 * 512
    D16, G16 = DCGANDiscriminator(channels=1, width=8, image_size=16), DCGANGenerator(16, 1, 8, image_size=16)
    assert _convs(D16) == [(8, 3, 1), (8, 4, 2), (16, 3, 1), (16, 4, 2), (32, 3, 1)]
    assert [m.out_channels for m in G16.modules() if isinstance(m, nn.ConvTranspose2d)] == [16, 8]
    for size in (8, 16, 64):
        D, G = DCGANDiscriminator(channels=1, width=4, image_size=size), DCGANGenerator(16, 1, 4, image_size=size)
        x = G(torch.randn(3, 16))
        assert x.shape == (3, 1, size, size) and D(x).shape == (3,)
    for bad in (4, 12, 48, True):
        with pytest.raises(ValueError, match="image_size must be a power of two >= 8"):
            DCGANGenerator(image_size=bad)


def _conditional_pair(k=5, ch=2, size=32, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    D = ConditionalResNetDiscriminator(num_classes=k, ch=ch, image_size=size).to(dtype)
    G = ConditionalResNetGenerator(z_dim=16, num_classes=k, ch=ch, image_size=size).to(dtype)
    return D, G


@pytest.mark.parametrize("size", [32, 64, 128])
def test_conditional_resnet_shapes_and_labels(size):
    D, G = _conditional_pair(size=size)
    z, y = torch.randn(4, 16), torch.tensor([0, 1, 2, 3])
    x = G(z, y)
    assert x.shape == (4, 3, size, size) and x.abs().max() <= 1
    assert D(x, y).shape == (4,)
    # the labels reach both players: once the class parameters are away from their initial values
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, nn.Embedding):
                m.weight.normal_()
    y2 = (y + 1) % 5
    assert not torch.allclose(G(z, y), G(z, y2))
    x = x.detach()
    assert not torch.allclose(D(x, y), D(x, y2))
    # D's projection term is <embed(y), h>: the logit difference between two labels is exactly that
    h = torch.relu(D.blocks(x)).mean(dim=(2, 3))
    torch.testing.assert_close(D(x, y) - D(x, y2), ((D.embed(y) - D.embed(y2)) * h).sum(-1))


def test_conditional_resnet_full_size_is_sngans():
    """At ImageNet's settings the pair has SN-GAN's 128x128 widths (about 42M and 39M parameters)."""
    with torch.device("meta"):
        G = ConditionalResNetGenerator(num_classes=1000)
        D = ConditionalResNetDiscriminator(num_classes=1000)
    n_g = sum(p.numel() for p in G.parameters())
    n_d = sum(p.numel() for p in D.parameters())
    assert 41e6 < n_g < 43e6 and 39e6 < n_d < 40e6
    assert [b.conv1.out_channels for b in G.blocks] == [1024, 512, 256, 128, 64]
    assert [b.conv1.out_channels for b in D.blocks] == [64, 128, 256, 512, 1024, 1024]


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(image_size=48), "power of two >= 32"),
        (dict(image_size=16), "power of two >= 32"),
        (dict(num_classes=0), "num_classes must be >= 1"),
        (dict(ch=0), "ch .* must be >= 1"),
    ],
)
def test_conditional_resnet_bad_options(kw, msg):
    for cls in (ConditionalResNetGenerator, ConditionalResNetDiscriminator):
        with pytest.raises(ValueError, match=msg):
            cls(**{"num_classes": 3, **kw})


def test_conditional_resnet_bad_labels():
    D, G = _conditional_pair()
    z, x = torch.randn(4, 16), torch.randn(4, 3, 32, 32)
    for bad in (torch.zeros(4), torch.zeros(3, dtype=torch.long), [0, 1, 2, 3]):
        with pytest.raises(ValueError, match=r"class labels must be an integer tensor of shape \(4,\)"):
            G(z, bad)
        with pytest.raises(ValueError, match="class labels must be"):
            D(x, bad)


def test_conditional_rk4_step_with_penalty():
    D, G = _conditional_pair()
    flat = FlatParams(D=D, G=G)
    st = ODEStepper(flat, "rk4", h=0.04, reg=0.02)
    real = torch.rand(4, 4, 3, 32, 32) * 2 - 1
    zs, yr, yf = torch.randn(4, 4, 16), torch.randint(5, (4, 4)), torch.randint(5, (4, 4))
    before = flat.params.clone()
    embeds = [D.embed.weight.detach().clone(), G.blocks[0].bn1.scale.weight.detach().clone()]
    out = st.step(
        lambda s: game_gradients(
            D, G, Batch(real[s.index], zs[s.index], yr[s.index], yf[s.index]), "ns", s.players, s.penalties
        )
    )
    assert torch.isfinite(flat.params).all() and not torch.equal(flat.params, before)
    assert torch.isfinite(out.value("g_reg")) and out.value("g_reg") > 0
    # the class parameters of both players moved (their gradients reached the flat buffer)
    assert not torch.equal(D.embed.weight, embeds[0]) and not torch.equal(G.blocks[0].bn1.scale.weight, embeds[1])
    with pytest.raises(ValueError, match="both y_real and y_fake"):
        game_gradients(D, G, Batch(real[0], zs[0], y_real=yr[0]))


def test_conditional_gradients_match_autograd_of_the_losses():
    """game_gradients on a conditional pair fills exactly dl_D/dtheta and dl_G/dphi with the labels applied."""
    from odegan_kernels.game import d_loss, g_loss

    D, G = _conditional_pair(seed=1)
    real, z = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 16)
    yr, yf = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 3, 2, 1])
    d_par, g_par = list(D.parameters()), list(G.parameters())
    fake = G(z, yf)
    want_d = torch.autograd.grad(d_loss(D(real, yr), D(fake.detach(), yf)), d_par)
    want_g = torch.autograd.grad(g_loss(D(G(z, yf), yf)), g_par)
    for p in d_par + g_par:
        p.grad = None
    game_gradients(D, G, Batch(real, z, yr, yf))
    for p, w in zip(d_par + g_par, list(want_d) + list(want_g)):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)
