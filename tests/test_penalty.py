import torch

from odegan_kernels import FlatParams, game_gradients, regulariser_grad
from odegan_kernels.game import g_loss
from odegan_kernels.models import mog_pair


def _pair():
    D, G = mog_pair(z_dim=4, hidden=6, seed=2)
    D, G = D.double(), G.double()
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    return D, G, z


def sq_generator_grad(D, G, z) -> torch.Tensor:
    lg = g_loss(D(G(z)))
    gs = torch.autograd.grad(lg, list(G.parameters()))
    return sum(g.square().sum() for g in gs)


def test_regulariser_grad_against_finite_differences():
    D, G, z = _pair()
    got = regulariser_grad(g_loss(D(G(z))), list(D.parameters()), list(G.parameters()))
    eps = 1e-6
    fd = []
    for p in D.parameters():
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            up = sq_generator_grad(D, G, z).item()
            flat[i] = old - eps
            down = sq_generator_grad(D, G, z).item()
            flat[i] = old
            fd.append((up - down) / (2 * eps))
    fd = torch.tensor(fd, dtype=torch.float64)
    rel = (got - fd).norm() / fd.norm()
    assert fd.norm() > 0
    assert rel <= 1e-5, f"relative error {rel:.2e}"


def test_game_gradients_penalty_matches_regulariser_grad():
    D, G, z = _pair()
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    real = torch.randn(16, 2, dtype=torch.float64)
    out = game_gradients(D, G, real, z, penalty=True)
    want = regulariser_grad(g_loss(D(G(z))), list(D.parameters()), list(G.parameters()))
    got = torch.autograd.grad(out.penalty, list(D.parameters()))
    assert torch.allclose(torch.cat([g.reshape(-1) for g in got]), want, rtol=1e-12, atol=1e-14)
    # the closure also filled G's gradient, exactly as a plain backward would
    gg = torch.autograd.grad(g_loss(D(G(z))), list(G.parameters()))
    assert torch.allclose(flat.player_grads("G")[: sum(g.numel() for g in gg)].sum(), sum(g.sum() for g in gg))
    for p, g in zip(G.parameters(), gg):
        assert torch.allclose(p.grad, g, rtol=1e-12, atol=1e-14)
