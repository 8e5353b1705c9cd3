"""The DiracGAN study against the closed forms of Mescheder et al. 2018 (minimax loss: f'(0) = 1/2).

Near the equilibrium the unregularised field is a rotation, J = [[0, -f'], [f', 0]]; regularisers damp it.
Each method here runs through the library's own optimisers (the ODE stepper, apply_penalties), so these
are claims about the training paths, not about a separate simulation.
"""

from __future__ import annotations

import cmath
import math

import pytest
import torch

from odegan_kernels.contract import Stage, apply_penalties, due
from odegan_kernels.study import Method, Run, closed_form, field, jacobian, main, methods, step_map_radius, trajectory

F1 = 0.5  # f'(0) of the minimax loss


def eig(method: Method) -> list[complex]:
    e = torch.linalg.eigvals(jacobian(method)).tolist()
    return sorted((complex(x) for x in e), key=lambda c: (c.imag, c.real))


def radius(points) -> list[float]:
    return [math.hypot(*p) for p in points]


def test_unregularised_simultaneous_gd_spirals_out_and_the_eigenvalues_are_imaginary():
    m = Method("unregularised", "simultaneous")
    e = eig(m)
    assert all(abs(x.real) < 1e-12 for x in e)
    assert [x.imag for x in e] == pytest.approx([-F1, F1], abs=1e-12)
    r = radius(trajectory(m, steps=300, h=0.1))
    assert all(b > a for a, b in zip(r, r[1:])), "every simultaneous step moves outwards"
    assert r[-1] > 1.3 * r[0]
    # one Euler step scales a rotation by |1 + i h f'| = sqrt(1 + h^2 f'^2)
    assert step_map_radius(m, h=0.1) == pytest.approx(math.sqrt(1 + 0.01 * F1**2), rel=1e-8)


def test_alternating_gd_neither_converges_nor_diverges():
    m = Method("unregularised", "alternating")
    r = radius(trajectory(m, steps=1000, h=0.1))
    assert 0.5 * r[0] < r[-1] < 2 * r[0]
    assert step_map_radius(m, h=0.1) == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("gamma", [0.3, 1.5])  # complex and real eigenvalues
@pytest.mark.parametrize("name", ["r1", "r2"])  # on DiracGAN grad_x D = psi everywhere: R1 and R2 agree
def test_r1_eigenvalues_match_the_closed_form(name, gamma):
    m = Method(name, "simultaneous", penalties={name: gamma})
    want = [-gamma / 2 + s * cmath.sqrt(gamma**2 / 4 - F1**2) for s in (1, -1)]
    want = sorted(want, key=lambda c: (c.imag, c.real))
    got = eig(m)
    assert all(abs(a - b) < 1e-10 for a, b in zip(got, want)), (got, want)
    assert all(abs(a - b) < 1e-12 for a, b in zip(sorted(closed_form(m), key=lambda c: (c.imag, c.real)), want))


def test_r1_converges_for_small_enough_h():
    """Euler on the R1 field: |1 + h lambda|^2 = 1 - h gamma + h^2 f'^2 < 1 exactly when h < gamma / f'^2 = 4 gamma."""
    gamma = 0.3
    m = Method("R1", "simultaneous", penalties={"r1": gamma})
    for h, converges in ((0.1, True), (1.0, True), (1.4, False)):
        rho = step_map_radius(m, h=h)
        assert rho == pytest.approx(math.sqrt(1 - h * gamma + h**2 * F1**2), rel=1e-8)
        assert (rho < 1) == converges
        last = radius(trajectory(m, steps=1000, h=h))[-1]
        assert (last < 1e-3) == converges, (h, last)


@pytest.mark.parametrize("update", ["simultaneous", "alternating"])
@pytest.mark.parametrize("name", ["WGAN", "WGAN-GP"])
def test_wgan_and_wgan_gp_do_not_converge(name, update):
    m = next(m for m in methods() if m.name == name and m.update == update)
    r = radius(trajectory(m, steps=1000, h=0.1))
    assert len(r) == 1001 and math.isfinite(r[-1])
    assert r[-1] > 0.5, f"{name} ({update}) reached {r[-1]}"
    if name == "WGAN":  # the clipped critic keeps orbiting: no step of the last 100 settles
        pts = trajectory(m, steps=1000, h=0.1)[-100:]
        assert max(abs(a[1] - b[1]) for a, b in zip(pts, pts[1:])) > 1e-3


def test_rk4_with_g_reg_converges_and_without_does_not():
    with_reg = next(m for m in methods() if m.name == "ODE-GAN + g_reg" and m.update == "rk4")
    without = next(m for m in methods() if m.name == "ODE-GAN" and m.update == "rk4")
    assert radius(trajectory(with_reg, steps=1000))[-1] < 1e-6
    r = radius(trajectory(without, steps=1000))
    assert r[-1] > 0.99 * r[0]
    # g_reg = grad_psi ||dl_G/dtheta||^2 = grad_psi (f' psi)^2 damps D by 2 lambda f'^2
    lam = with_reg.reg
    want = [-lam * F1**2 + s * cmath.sqrt(lam**2 * F1**4 - F1**2) for s in (1, -1)]
    assert all(abs(a - b) < 1e-10 for a, b in zip(eig(with_reg), sorted(want, key=lambda c: (c.imag, c.real))))


@pytest.mark.parametrize("method", methods(), ids=lambda m: m.label)
def test_the_studied_field_is_the_training_path(method):
    """field() (differentiated for the Jacobian) equals what the optimisers integrate: the closure's gradients
    plus apply_penalties, at points off the equilibrium."""
    gen = torch.Generator().manual_seed(1)
    for x in torch.randn(3, 2, generator=gen, dtype=torch.float64):
        run = Run(method, *x.tolist())
        run.flat.zero_grad()
        everyone = (0, 1)
        pens = {**due(run.specs, 0, everyone), **({"g_reg": method.reg} if method.reg > 0 else {})}
        stage = Stage(0, 0, everyone, pens)
        apply_penalties(run.closure(stage), run.flat, stage.penalties, stage.players)
        got = torch.cat([run.D.psi.grad, run.G.theta.grad])
        torch.testing.assert_close(-field(method, x), got, rtol=1e-12, atol=1e-14)


def test_closed_forms_agree_with_autograd_wherever_the_field_is_smooth():
    for m in methods():
        cf = closed_form(m)
        if cf is None:
            assert m.penalties.get("wgan_gp"), "only WGAN-GP's field is not differentiable at the equilibrium"
            continue
        tol = 5e-3 if m.noise else 1e-10  # instance noise: the expectation over a 256-point quantile grid
        cf = sorted(cf, key=lambda c: (c.imag, c.real))
        assert all(abs(a - b) < tol for a, b in zip(eig(m), cf)), (m.label, eig(m), cf)


def test_the_command_writes_the_table_and_the_figure(tmp_path):
    assert main(["--steps", "30", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n| ") == 2 + len(methods())
    assert (tmp_path / "trajectories.png").stat().st_size > 10_000
    assert "WGAN-GP" in table and "none: " in table


@pytest.mark.parametrize("preset,converges", [("dirac-r1", True), ("dirac-consensus", True), ("dirac-wgan-gp", False)])
def test_the_trainer_presets_reproduce_the_study(tmp_path, preset, converges):
    """The trainer's options reach the same answer as the study (float32 here, float64 there)."""
    from odegan_kernels.train import Trainer, make_config

    cfg = make_config(preset, out=str(tmp_path), progress=False, eval_every=10**6, log_every=500)
    summary = Trainer(cfg).run(resume=False)
    method = {"dirac-r1": "R1", "dirac-consensus": "consensus", "dirac-wgan-gp": "WGAN-GP"}[preset]
    m = next(m for m in methods() if m.name == method and m.update == "simultaneous")
    study_end = trajectory(m, steps=cfg.steps, h=cfg.h)[-1]
    assert (summary["radius"] < 1e-3) == converges, summary
    assert summary["radius"] == pytest.approx(math.hypot(*study_end), rel=1e-2, abs=1e-6)
