"""g_reg, ODE-GAN's regulariser: its gradient against central differences of its value, its three methods
(double backward, finite difference, jvp) against each other, in the stepper too; and the cheaper gradient
evaluation (one forward of D on the fakes, one backward for zero-sum losses) against the plain one."""

import pytest
import torch
from torch import nn

from odegan_kernels import Batch, FlatParams, ODEStepper, game_gradients
from odegan_kernels.game import LOSSES, d_loss, g_loss, g_reg_grad
from odegan_kernels.game.g_reg import fd_epsilon
from odegan_kernels.models import DCGANGenerator, mog_pair


def _flat_g_reg(D, G, z) -> torch.Tensor:
    """g_reg by its double backward, as one flat vector."""
    return torch.cat([g.reshape(-1) for g in g_reg_grad(D, G, g_loss, z)])


def _sq_generator_grad(D, G, z) -> torch.Tensor:
    gs = torch.autograd.grad(g_loss(D(G(z))), list(G.parameters()))
    return sum(g.square().sum() for g in gs)


def test_g_reg_against_central_differences_of_its_value():
    # (this start point has no ReLU kink within eps of a parameter: a central difference across one is wrong)
    D, G = (m.double() for m in mog_pair(z_dim=4, hidden=6, seed=2))
    z = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = _flat_g_reg(D, G, z)
    eps, fd = 1e-6, []
    for p in D.parameters():
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            up = _sq_generator_grad(D, G, z).item()
            flat[i] = old - eps
            down = _sq_generator_grad(D, G, z).item()
            flat[i] = old
            fd.append((up - down) / (2 * eps))
    fd = torch.tensor(fd, dtype=torch.float64)
    rel = (got - fd).norm() / fd.norm()
    assert fd.norm() > 0
    assert rel <= 1e-5, f"relative error {rel:.2e}"


def test_game_gradients_g_reg_term_is_g_reg_and_g_gets_its_plain_gradient():
    D, G = mog_pair(z_dim=4, hidden=6, seed=2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    FlatParams(D=D, G=G, dtype=torch.float64)
    real = torch.randn(16, 2, dtype=torch.float64)
    out = game_gradients(D, G, Batch(real, z), penalties=["g_reg"])
    assert set(out.terms) == {"g_reg"} and out.terms["g_reg"].players == (0,)
    got = torch.autograd.grad(out.value("g_reg"), list(D.parameters()))
    assert torch.allclose(torch.cat([g.reshape(-1) for g in got]), _flat_g_reg(D, G, z), rtol=1e-12, atol=1e-14)
    gg = torch.autograd.grad(g_loss(D(G(z))), list(G.parameters()))  # G's gradient, as a plain backward fills it
    for p, g in zip(G.parameters(), gg):
        assert torch.allclose(p.grad, g, rtol=1e-12, atol=1e-14)


def _smooth_pair(seed=0):
    torch.manual_seed(seed)
    D = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1), nn.Flatten(0))
    G = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    return D, G


def _setup(dtype, seed=0, smooth=False):
    D, G = _smooth_pair(seed) if smooth else mog_pair(z_dim=8, hidden=16, seed=seed)
    D, G = D.to(dtype), G.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(64, 8, generator=gen, dtype=dtype)
    real = torch.randn(64, 2, generator=gen, dtype=dtype)
    return D, G, z, real


def _rel(a, b):
    a = torch.cat([x.reshape(-1) for x in a])
    b = torch.cat([x.reshape(-1) for x in b])
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "dtype,smooth,fd_tol", [(torch.float64, False, 1e-7), (torch.float64, True, 1e-7), (torch.float32, True, 2e-3)]
)
def test_methods_agree_with_double_backward(dtype, smooth, fd_tol):
    """The eps rule assumes smoothness. A ReLU discriminator makes grad_theta l_G jump where D's activation
    pattern switches, so a central difference is only right while eps stays below the nearest kink: true
    of float64's eps here, not of float32's (measured: 1e-2 relative error at best, see game/g_reg.py)."""
    D, G, z, _ = _setup(dtype, smooth=smooth)
    lf = lambda logits: g_loss(logits, "ns")
    exact = g_reg_grad(D, G, lf, z, "double_backward")
    fd = g_reg_grad(D, G, lf, z, "finite_difference")
    jv = g_reg_grad(D, G, lf, z, "jvp")
    assert _rel(fd, exact) <= fd_tol
    assert _rel(jv, exact) <= (1e-10 if dtype == torch.float64 else 1e-5)


def test_fd_epsilon_rule():
    p = [torch.full((100,), 3.0)]
    assert fd_epsilon(p).item() == pytest.approx(torch.finfo(torch.float32).eps ** (1 / 3) * 3.0)
    assert fd_epsilon([torch.full((100,), 0.1, dtype=torch.float64)]).item() == pytest.approx(
        torch.finfo(torch.float64).eps ** (1 / 3)
    )


def test_methods_leave_parameters_and_bn_statistics_alone():
    torch.manual_seed(0)
    G = DCGANGenerator(z_dim=16)
    D = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 1), nn.Flatten(0))
    z = torch.randn(4, 16)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    lf = lambda logits: g_loss(logits)
    exact = g_reg_grad(D, G, lf, z, "double_backward")
    fd = g_reg_grad(D, G, lf, z, "finite_difference")
    for k, v in G.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert _rel(fd, exact) <= 5e-3  # float32, a BN network
    with pytest.raises(ValueError, match="reg_method='jvp' cannot trace BatchNorm"):
        g_reg_grad(D, G, lf, z, "jvp")


def plain_gradients(D, G, real, z, loss):
    """The textbook evaluation: separate forwards for each loss, fake detached for D."""
    fake = G(z)
    ld = d_loss(D(real), D(fake.detach()), loss)
    gd = torch.autograd.grad(ld, list(D.parameters()))
    lg = g_loss(D(fake), loss)
    gg = torch.autograd.grad(lg, list(G.parameters()))
    return list(gd), list(gg)


@pytest.mark.parametrize("loss", LOSSES)
def test_cheaper_evaluation_equals_plain(loss):
    D, G, z, real = _setup(torch.float64)
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    gd, gg = plain_gradients(D, G, real, z, loss)
    flat.zero_grad()
    game_gradients(D, G, Batch(real, z), loss)  # zero-sum losses take the one-backward path here
    assert _rel([p.grad for p in D.parameters()], gd) <= 1e-13
    assert _rel([p.grad for p in G.parameters()], gg) <= 1e-13


def test_zero_sum_flag_is_checked():
    D, G, z, real = _setup(torch.float64)
    FlatParams(D=D, G=G, dtype=torch.float64)
    with pytest.raises(ValueError, match="zero_sum=True needs a zero-sum loss"):
        game_gradients(D, G, Batch(real, z), "ns", zero_sum=True)


def test_bf16_autocast_accuracy():
    """bf16 forward/backward against fp32: error of the order of bf16's precision (2^-8), stated."""
    D, G, z, real = _setup(torch.float32)
    flat = FlatParams(D=D, G=G)
    flat.zero_grad()
    game_gradients(D, G, Batch(real, z))
    ref = flat.grads.clone()
    flat.zero_grad()
    game_gradients(D, G, Batch(real, z), autocast=True)
    rel = ((flat.grads - ref).norm() / ref.norm()).item()
    assert torch.isfinite(flat.grads).all() and flat.grads.dtype == torch.float32
    assert rel <= 3e-2, rel


@pytest.mark.parametrize("method", ["finite_difference", "jvp"])
@pytest.mark.parametrize("placement", ["first_stage", "after_step"])
def test_step_with_each_g_reg_method_matches_double_backward(method, placement):
    results = []
    for m in ("double_backward", method):
        D, G, z, real = _setup(torch.float64)
        flat = FlatParams(D=D, G=G, dtype=torch.float64)
        st = ODEStepper(flat, "rk4", h=0.1, reg=0.5, reg_at=placement)
        closure = lambda stage: game_gradients(
            D, G, Batch(real, z), players=stage.players, penalties=stage.penalties, reg_method=m
        )
        for _ in range(3):
            st.step(closure)
        results.append(flat.params.clone())
    assert ((results[1] - results[0]).norm() / results[0].norm()).item() <= 1e-9


def test_methods_agree_on_a_conditional_pair():
    """The labels reach every g_reg method: G(z, y) and D(x, y) in the double backward, the central
    difference and the jvp (G in eval mode, so jvp has no BN statistics to trace), in float64."""
    from odegan_kernels.models import ConditionalResNetDiscriminator, ConditionalResNetGenerator

    torch.manual_seed(0)
    D = ConditionalResNetDiscriminator(num_classes=3, ch=2, image_size=32).double()
    G = ConditionalResNetGenerator(z_dim=8, num_classes=3, ch=2, image_size=32).double().eval()
    with torch.no_grad():
        # Class parameters away from their initial values, so the labels matter; biases away from zero:
        # zero biases on exact zeros of a narrow eval-mode G put ReLU inputs exactly at their kink,
        # where the central difference is wrong at every eps (measured: error ~ 1/eps).
        for name, p in list(G.named_parameters()) + list(D.named_parameters()):
            if "bias" in name or "scale" in name or "shift" in name:
                p.add_(0.3 * torch.randn_like(p))
    z, y = torch.randn(6, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
    lf = lambda logits: g_loss(logits)
    exact = g_reg_grad(D, G, lf, z, "double_backward", y=y)
    assert _rel(g_reg_grad(D, G, lf, z, "jvp", y=y), exact) <= 1e-10
    assert _rel(g_reg_grad(D, G, lf, z, "finite_difference", y=y), exact) <= 1e-6
    other = g_reg_grad(D, G, lf, z, "double_backward", y=(y + 1) % 3)
    assert _rel(other, exact) > 1e-3  # and they change it


def test_the_finite_difference_hazard_the_warning_names_is_real():
    """g_reg by finite differences on a ReLU pair: most calls agree with the double backward to ~1e-11, but a call
    whose step crosses an activation switch errs by orders of magnitude (measured 4.2% of 1500 calls on this pair,
    worst 551x: python/fd_switch_rate.py); the engine says so when it is built with that method."""
    from odegan_kernels.game import AutogradEngine
    from odegan_kernels.game.autograd import FD_HAZARD

    errors = []
    for i in range(200):
        D, G = mog_pair(4, 16, seed=i % 10, dtype=torch.float64)
        z = torch.randn(64, 4, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        exact, fd = (torch.cat([t.flatten() for t in g_reg_grad(D, G, lambda o: g_loss(o, "ns"), z, m)])
                     for m in ("double_backward", "finite_difference"))  # fmt: skip
        errors.append(((fd - exact).norm() / exact.norm()).item())
    errors.sort()
    assert errors[100] < 1e-9 and errors[-1] > 1e-2, (errors[100], errors[-1])
    with pytest.warns(UserWarning, match="4-7% of evaluations cross an activation switch") as rec:
        AutogradEngine(D, G, reg_method="finite_difference")
    assert str(rec[0].message) == FD_HAZARD
