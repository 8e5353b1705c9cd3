"""The gradient-penalty family (g_reg, R1, R2, WGAN-GP, consensus) against an independent torch.func computation.

Ours: game_gradients returns each penalty as a term (its value through the fused sqnorm) and apply_penalties, the
one path every optimiser uses, turns it into the players' gradients. The reference: per-sample input gradients by
vmap(grad), the players' gradients by torch.func.grad, in float64, with no sqnorm. Relative errors measured
on this machine (``python tests/test_penalty_gradients.py`` prints them) are ~1e-16 (MLP) and ~1e-15 (DCGAN, conditional
ResNet); the bound below is 1e-10.

    python tests/test_penalty_gradients.py     # print the relative error of every penalty on every pair
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from odegan_kernels import Batch, FlatParams, game_gradients
from odegan_kernels.contract import PENALTIES, apply_penalties
from odegan_kernels.game import d_loss, g_loss
from odegan_kernels.models import DCGANDiscriminator, DCGANGenerator, mog_pair
from odegan_kernels.models.resnet128 import ConditionalResNetDiscriminator, ConditionalResNetGenerator

FIELD_PENALTIES = tuple(k for k in PENALTIES if k != "g_reg")
TOL64 = 1e-10


def _batch_stats_only(G: nn.Module) -> nn.Module:
    """BN on batch statistics without running ones: the same function in training mode, and no buffer writes
    (torch.func cannot trace them)."""
    for m in G.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return G


BATCH = {"mlp": 6, "dcgan": 2, "conditional": 4}  # DCGAN in float64 on a CPU: seconds per penalty at batch 2


def make_pair(kind: str, dtype=torch.float64, batch: int | None = None, seed: int = 0):
    """(D, G, real, z, y_real, y_fake) of one of the pairs: mlp (the toy's), dcgan, conditional (resnet128)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    batch = batch or BATCH[kind]
    y_real = y_fake = None
    if kind == "mlp":
        D, G = mog_pair(z_dim=4, hidden=8, seed=seed)
        real, z = torch.randn(batch, 2, generator=gen), torch.randn(batch, 4, generator=gen)
    elif kind == "dcgan":
        D, G = DCGANDiscriminator(), DCGANGenerator(z_dim=16)
        real, z = torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1, torch.randn(batch, 16, generator=gen)
    else:
        D = ConditionalResNetDiscriminator(num_classes=3, ch=2, image_size=32)
        G = ConditionalResNetGenerator(z_dim=8, num_classes=3, ch=2, image_size=32)
        real, z = torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1, torch.randn(batch, 8, generator=gen)
        y_real, y_fake = torch.randint(3, (batch,), generator=gen), torch.randint(3, (batch,), generator=gen)
    D, G = D.to(dtype), _batch_stats_only(G.to(dtype))
    return D, G, real.to(dtype), z.to(dtype), y_real, y_fake


def ours(D, G, real, z, name, loss="ns", mix=None, y_real=None, y_fake=None, autocast=False):
    """The penalty's gradient as the optimisers get it: game_gradients' term, then apply_penalties (weight 1)
    into zeroed flat gradients. Returns (D's part, G's part) as flat vectors."""
    flat = FlatParams(D=D, G=G, dtype=next(D.parameters()).dtype)
    flat.zero_grad()
    res = game_gradients(D, G, Batch(real, z, y_real, y_fake, mix), loss, penalties=(name,), autocast=autocast)
    flat.zero_grad()  # keep only the penalty's gradient (its graph is still alive in res.terms)
    values = apply_penalties(res, flat, {name: 1.0})
    assert set(values) == {name} and torch.isfinite(values[name])
    return tuple(torch.cat([p.grad.reshape(-1) for p in m.parameters()]) for m in (D, G))


def reference(D, G, real, z, name, loss="ns", mix=None, y_real=None, y_fake=None):
    """The same gradients by torch.func, written from the definitions (game/penalties.py's module text)."""
    theta = {n: p.detach() for n, p in D.named_parameters()}
    phi = {n: p.detach() for n, p in G.named_parameters()}
    cr = () if y_real is None else (y_real,)
    cf = () if y_fake is None else (y_fake,)

    def D_of(th, x, *c):
        return functional_call(D, th, (x, *c))

    def G_of(ph):
        return functional_call(G, ph, (z, *cf))

    def per_sample_input_grads(th, x, c):
        one = lambda xi, *ci: D_of(th, xi.unsqueeze(0), *(t.unsqueeze(0) for t in ci)).sum()  # noqa: E731
        return vmap(grad(one))(x, *c)

    sq = lambda d: sum(v.square().sum() for v in d.values())  # noqa: E731
    zeros = lambda d: {k: torch.zeros_like(v) for k, v in d.items()}  # noqa: E731
    fake = G_of(phi).detach()
    if name == "r1":
        return grad(lambda th: 0.5 * per_sample_input_grads(th, real, cr).square().sum() / len(real))(theta), zeros(phi)
    if name == "r2":
        return grad(lambda th: 0.5 * per_sample_input_grads(th, fake, cf).square().sum() / len(real))(theta), zeros(phi)
    if name == "wgan_gp":
        u = mix.reshape(-1, *([1] * (real.dim() - 1)))
        x_hat = u * real + (1 - u) * fake

        def gp(th):
            g = per_sample_input_grads(th, x_hat, cr).flatten(1)
            return (torch.linalg.vector_norm(g, dim=1) - 1).square().mean()  # 0 at a zero gradient, as ours

        return grad(gp)(theta), zeros(phi)
    if name == "g_reg":

        def g_norm(th):
            return sq(grad(lambda ph: g_loss(D_of(th, G_of(ph), *cf), loss))(phi))

        return grad(g_norm)(theta), zeros(phi)

    def half_field_norm(th, ph):  # consensus
        g_th = grad(lambda t: d_loss(D_of(t, real, *cr), D_of(t, G_of(ph), *cf), loss))(th)
        g_ph = grad(lambda p: g_loss(D_of(th, G_of(p), *cf), loss))(ph)
        return 0.5 * (sq(g_th) + sq(g_ph))

    return grad(half_field_norm, argnums=(0, 1))(theta, phi)


def flat_of(d: dict, module: nn.Module) -> torch.Tensor:
    return torch.cat([d[n].reshape(-1) for n, p in module.named_parameters() if p.requires_grad])


def rel_error(kind: str, name: str, loss: str = "ns") -> tuple[float, float]:
    """(relative error of ours against the reference over both players' parts, the reference's norm)."""
    D, G, real, z, yr, yf = make_pair(kind)
    mix = torch.rand(real.shape[0], generator=torch.Generator().manual_seed(5), dtype=real.dtype)
    got = torch.cat(ours(D, G, real, z, name, loss, mix, yr, yf))
    rd, rg = reference(D, G, real, z, name, loss, mix, yr, yf)
    want = torch.cat([flat_of(rd, D), flat_of(rg, G)])
    assert not torch.isnan(got).any(), f"{kind} {name}: NaN in our gradient"
    return ((got - want).norm() / want.norm()).item(), want.norm().item()


@pytest.mark.parametrize("name", PENALTIES)
@pytest.mark.parametrize("loss", ["ns", "lsgan"])
def test_penalty_gradient_matches_torch_func_on_the_toy_mlps(name, loss):
    err, norm = rel_error("mlp", name, loss)
    assert norm > 0 and err <= TOL64, f"{name} ({loss}): relative error {err:.2e}"


@pytest.mark.slow  # ~5-15 s each on 2 cores: the reference differentiates DCGAN twice in float64
@pytest.mark.parametrize("name", PENALTIES)
def test_penalty_gradient_matches_torch_func_on_dcgan(name):
    err, norm = rel_error("dcgan", name)
    assert norm > 0 and err <= TOL64, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("name", PENALTIES)
def test_penalty_gradient_matches_torch_func_on_the_conditional_resnet(name):
    err, norm = rel_error("conditional", name)
    assert norm > 0 and err <= TOL64, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("name", PENALTIES)
def test_float32_and_bf16_autocast_against_float64(name):
    """float32 within 1e-4 of the float64 gradient (measured 3e-8 to 2e-7); bf16 autocast (forward/backward in
    bf16) within 0.1, and finite: a loose bound, as bf16 has 8 bits of mantissa (measured 3e-3 to 9e-3)."""
    D, G, real, z, _, _ = make_pair("mlp")
    mix = torch.rand(real.shape[0], generator=torch.Generator().manual_seed(5), dtype=real.dtype)
    want = torch.cat(ours(D, G, real, z, name, mix=mix))
    D32, G32 = D.float(), G.float()
    for autocast, tol in ((False, 1e-4), (True, 0.1)):
        got = torch.cat(ours(D32, G32, real.float(), z.float(), name, mix=mix.float(), autocast=autocast))
        assert torch.isfinite(got).all()
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err <= tol, f"{name} autocast={autocast}: relative error {err:.2e}"


def test_every_penalty_goes_through_the_fused_sqnorm(monkeypatch):
    from odegan_kernels import ops

    calls = []
    real_sqnorm = ops.sqnorm

    def counting(tensors, backend="auto"):
        calls.append(len(list(tensors)))
        return real_sqnorm(tensors, backend=backend)

    monkeypatch.setattr(ops, "sqnorm", counting)
    D, G, real, z, _, _ = make_pair("mlp")
    for name in FIELD_PENALTIES:
        calls.clear()
        res = game_gradients(D, G, Batch(real, z), penalties=(name,))
        assert name in res.terms and calls, f"{name} did not call ops.sqnorm"
    calls.clear()
    res = game_gradients(D, G, Batch(real, z), penalties=("consensus",))
    n_params = len(list(D.parameters())) + len(list(G.parameters()))
    assert calls == [n_params], "consensus: one sqnorm over every gradient tensor of both players"


def test_penalties_are_zero_where_theory_says():
    """WGAN-GP vanishes when every interpolate's gradient has unit norm (D(x) = <w, x> with |w| = 1); R1 and R2
    vanish for a constant D; consensus vanishes where both players' gradients do."""
    D = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Flatten(0)).double()
    with torch.no_grad():
        D[0].weight.copy_(torch.tensor([[0.6, 0.8]]))
    G = nn.Sequential(nn.Linear(3, 2)).double()
    real, z = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    res = game_gradients(D, G, Batch(real, z), "wasserstein", penalties=("wgan_gp", "r1", "r2"))
    assert res.value("wgan_gp").abs().item() < 1e-15
    assert res.value("r1").item() == pytest.approx(0.5) and res.value("r2").item() == pytest.approx(0.5)
    with torch.no_grad():
        D[0].weight.zero_()
    res = game_gradients(D, G, Batch(real, z), "wasserstein", penalties=("wgan_gp", "r1", "consensus"))
    assert res.value("r1").item() == 0 and res.value("wgan_gp").item() == pytest.approx(1.0)
    # D = 0 with the wasserstein loss: dl_D/dw = mean(fake) - mean(real) != 0, so consensus is not zero
    assert res.value("consensus").item() > 0


def test_consensus_in_a_one_player_call_fills_only_that_player():
    """A decoupled stage asks for one player: consensus still needs both gradients, but only the asked-for
    player's gradient (and penalty part) lands."""
    D, G, real, z, _, _ = make_pair("mlp")
    full_d, full_g = ours(D, G, real, z, "consensus")
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    flat.zero_grad()
    res = game_gradients(D, G, Batch(real, z), players=(1,), penalties=("consensus",))
    flat.zero_grad()
    apply_penalties(res, flat, {"consensus": 1.0}, players=(1,))
    assert (flat.player_grads(0) == 0).all()
    got_g = torch.cat([p.grad.reshape(-1) for p in G.parameters()])
    torch.testing.assert_close(got_g, full_g, rtol=1e-12, atol=1e-14)
    assert full_d.norm() > 0


def test_refusals_name_the_fix():
    D, G, real, z, _, _ = make_pair("mlp")
    with pytest.raises(ValueError, match="unknown penalties"):
        game_gradients(D, G, Batch(real, z), penalties=("r3",))
    with pytest.raises(ValueError, match="regularise D: players must include 0"):
        game_gradients(D, G, Batch(real, z), players=(1,), penalties=("r1",))
    res = game_gradients(D, G, Batch(real, z))
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    with pytest.raises(TypeError, match="PenaltyTerm 'r1'"):
        apply_penalties(res, flat, {"r1": 1.0})
    with pytest.raises(ValueError, match="engine='mlp' cannot run here: the gradient penalties"):
        game_gradients(D, G, Batch(real, z), penalties=("r1",), engine="mlp")


def test_instance_noise_matches_between_the_engines():
    """The hand-derived engine with instance noise (and the g_reg penalty through it) against autograd."""
    D, G, real, z, _, _ = make_pair("mlp")
    gen = torch.Generator().manual_seed(3)
    noise = tuple(0.3 * torch.randn(real.shape, generator=gen, dtype=real.dtype) for _ in range(2))
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    got = {}
    for engine in ("autograd", "mlp"):
        flat.zero_grad()
        res = game_gradients(D, G, Batch(real, z, noise=noise), penalties=["g_reg"], engine=engine)
        apply_penalties(res, flat, {"g_reg": 0.5})
        got[engine] = flat.grads.clone()
    torch.testing.assert_close(got["mlp"], got["autograd"], rtol=1e-10, atol=1e-12)
    flat.zero_grad()
    game_gradients(D, G, Batch(real, z), penalties=["g_reg"])
    assert not torch.allclose(flat.grads, got["autograd"]), "the noise must change the gradients"


if __name__ == "__main__":
    torch.set_num_threads(2)
    print("| pair | penalty | relative error (float64, vs torch.func) | reference norm |")
    print("| --- | --- | --- | --- |")
    for kind in ("mlp", "dcgan", "conditional"):
        for name in PENALTIES:
            err, norm = rel_error(kind, name)
            print(f"| {kind} | {name} | {err:.1e} | {norm:.3g} |")
    sys.exit(0)
