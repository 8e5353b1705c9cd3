"""DiracGAN: dynamics known in closed form near equilibrium, so integrator claims are tested here.

Mescheder's game is zero-sum (the minimax loss): its exact flow keeps the radius constant, so any growth
or decay is the integrator's (or the regulariser's). With the non-saturating loss the exact flow itself
contracts (d/dt r^2 = -psi*theta*tanh(psi*theta/2)), which would hide Euler's instability.
"""

import math

import pytest
import torch

from odegan_kernels import TABLEAUS, Batch, FlatParams, ODEStepper, game_gradients
from odegan_kernels.models.dirac import dirac_pair


def run(method, psi, theta, h, steps, reg=0.0, penalty="first_stage", coupling="joint", loss="minimax"):
    D, G = dirac_pair(psi, theta, dtype=torch.float64)
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    st = ODEStepper(flat, method, h=h, reg=reg, reg_at=penalty, coupling=coupling)
    real = torch.zeros(1, 1, dtype=torch.float64)
    z = torch.zeros(1, 1, dtype=torch.float64)
    closure = lambda stage: game_gradients(D, G, Batch(real, z), loss, stage.players, stage.penalties)
    radii = [flat.params.norm().item()]
    for _ in range(steps):
        st.step(closure)
        radii.append(math.hypot(D.psi.item(), G.theta.item()))
    return radii


def test_simultaneous_euler_diverges_without_regulariser():
    radii = run("euler", 0.5, 0.5, h=0.2, steps=200)
    assert radii[-1] > 1.5 * radii[0]
    assert all(b > a for a, b in zip(radii, radii[1:]))


@pytest.mark.parametrize("coupling,penalty", [("joint", "first_stage"), ("decoupled", "after_step")])
@pytest.mark.parametrize("loss", ["minimax", "ns"])
def test_rk4_with_regulariser_converges(coupling, penalty, loss):
    radii = run("rk4", 0.5, 0.5, h=0.2, steps=600, reg=1.0, penalty=penalty, coupling=coupling, loss=loss)
    assert radii[-1] < 1e-3, radii[-1]


def test_rk4_without_regulariser_does_not_converge():
    radii = run("rk4", 0.5, 0.5, h=0.2, steps=600)
    assert radii[-1] > 0.99 * radii[0]


@pytest.mark.parametrize("method", sorted(TABLEAUS))
@pytest.mark.parametrize("h", [0.2, 1.0])
def test_contraction_matches_stability_function(method, h):
    """Near (0, 0) the field is a rotation at frequency 1/2, so one step scales the radius by |R(ih/2)|."""
    r0 = 1e-5
    radii = run(method, r0, 0.0, h=h, steps=3)
    want = abs(TABLEAUS[method].stability(0.5j * h))
    for a, b in zip(radii, radii[1:]):
        assert b / a == pytest.approx(want, rel=1e-7)
