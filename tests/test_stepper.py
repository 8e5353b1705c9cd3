"""Integrators against known solutions of linear ODEs, and the stepper's options."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from odegan_kernels import TABLEAUS, FlatParams, ODEStepper, PenaltyTerm, StageResult, Tableau, compile_tableau
from odegan_kernels.ode import cifar_schedule


def linear_setup(A: torch.Tensor, y0: torch.Tensor, backend="auto"):
    y = nn.Parameter(y0.clone())
    flat = FlatParams([[y]], names=["y"], dtype=torch.float64)

    def closure():  # gradient = -velocity
        y.grad.copy_(-(A @ y.detach()))

    return y, flat, closure


def dense_step_matrix(tab: Tableau, M: torch.Tensor, h: float) -> torch.Tensor:
    """R(hM) = I + h (b^T kron M) (I - h A kron M)^-1 (1 kron I): one RK step of y' = My."""
    s, n = tab.stages, M.shape[0]
    Ah = torch.zeros(s, s, dtype=torch.float64)
    for i, row in enumerate(tab.A):
        Ah[i + 1, : len(row)] = torch.tensor(row, dtype=torch.float64)
    b = torch.tensor(tab.b, dtype=torch.float64).view(1, -1)
    eye = torch.eye(n, dtype=torch.float64)
    K = torch.kron(torch.eye(s, dtype=torch.float64), eye) - h * torch.kron(Ah, M)
    stages = torch.linalg.solve(K, torch.kron(torch.ones(s, 1, dtype=torch.float64), eye))
    return eye + h * torch.kron(b, M) @ stages


@pytest.mark.parametrize("method", sorted(TABLEAUS))
@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_stepper_equals_dense_rk_formula(method, backend):
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    y0 = torch.randn(6, generator=gen, dtype=torch.float64)
    y, flat, closure = linear_setup(A, y0)
    st = ODEStepper(flat, method, h=0.13, backend=backend)
    R = dense_step_matrix(TABLEAUS[method], A, 0.13)
    expected = y0
    for _ in range(3):
        st.step(closure)
        expected = R @ expected
        assert torch.allclose(y.detach(), expected, rtol=0, atol=1e-12), (y.detach() - expected).abs().max()


def test_per_player_step_sizes():
    gen = torch.Generator().manual_seed(1)
    A, B = (torch.randn(3, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    u = nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))
    w = nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))
    u0, w0 = u.detach().clone(), w.detach().clone()
    flat = FlatParams([[u], [w]], names=["D", "G"], dtype=torch.float64)

    def closure():
        u.grad.copy_(-(A @ u.detach()))
        w.grad.copy_(-(B @ w.detach()))

    ODEStepper(flat, "rk4", h=[0.05, 0.2]).step(closure)
    assert torch.allclose(u.detach(), dense_step_matrix(TABLEAUS["rk4"], A, 0.05) @ u0, atol=1e-13)
    assert torch.allclose(w.detach(), dense_step_matrix(TABLEAUS["rk4"], B, 0.2) @ w0, atol=1e-13)


@pytest.mark.parametrize(
    "method,order", [("euler", 1), ("heun", 2), ("midpoint", 2), ("ralston", 2), ("rk3", 3), ("rk4", 4)]
)
def test_order_of_convergence(method, order):
    """On a rotation with slight damping (a bilinear game's field), error ~ h^p."""
    A = torch.tensor([[-0.1, -1.0], [1.0, -0.1]], dtype=torch.float64)
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    T = 2.0
    exact = torch.linalg.matrix_exp(A * T) @ y0
    hs, errs = [], []
    for n in (10, 20, 40, 80):
        y, flat, closure = linear_setup(A, y0)
        st = ODEStepper(flat, method, h=T / n)
        for _ in range(n):
            st.step(closure)
        hs.append(T / n)
        errs.append((y.detach() - exact).norm().item())
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - order) <= 0.15, f"{method}: fitted order {slope:.3f}, expected {order}"


def test_compile_tableau_rejects_non_two_register():
    # stage 4 weighs stages 1, 2 as 0.1 : 0.2, but b weighs them 0.2 : 0.3
    tab = Tableau("odd", ((0.5,), (0.3, 0.4), (0.1, 0.2, 0.3)), (0.2, 0.3, 0.3, 0.2), 2)
    with pytest.raises(ValueError, match="not expressible with two registers"):
        compile_tableau(tab)
    with pytest.raises(ValueError, match="rows of length"):
        compile_tableau(Tableau("bad", ((1.0, 2.0),), (0.5, 0.5), 2))


def test_stability_function_matches_dense():
    for tab in TABLEAUS.values():
        z = 0.3j - 0.1
        R = dense_step_matrix(tab, torch.tensor([[z.real, -z.imag], [z.imag, z.real]], dtype=torch.float64), 1.0)
        assert abs(abs(tab.stability(z)) - torch.linalg.eigvals(R).abs().max().item()) < 1e-12


def test_stepper_argument_errors():
    y, flat, closure = linear_setup(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown method"):
        ODEStepper(flat, "rk5")
    with pytest.raises(ValueError, match="positive and finite"):
        ODEStepper(flat, h=-1.0)
    with pytest.raises(ValueError, match="reg"):
        ODEStepper(flat, reg=float("nan"))
    with pytest.raises(ValueError, match="coupling must be"):
        ODEStepper(flat, coupling="loose")
    with pytest.raises(ValueError, match="reg_at must be"):
        ODEStepper(flat, reg_at="later")
    with pytest.raises(ValueError, match="h has 2 step sizes for 1 players"):
        ODEStepper(flat, h=[0.1, 0.2])
    with pytest.raises(ValueError, match="first stage no weight"):
        ODEStepper(flat, "midpoint", reg=0.1)
    with pytest.raises(TypeError, match="closure that takes the Stage"):
        ODEStepper(flat, reg=0.1).step(closure)


def _two_euler_steps(make):
    """Two Euler steps of y' = A y from (1, 0) with a schedule of 1/4 then 1 on h = 0.4; make(flat) -> step()."""
    A = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    y, flat, closure = linear_setup(A, y0)
    step = make(flat)
    step(closure)
    assert torch.allclose(y.detach(), y0 + 0.1 * (A @ y0), atol=1e-15)
    y1 = y.detach().clone()
    step(closure)
    assert torch.allclose(y.detach(), y1 + 0.4 * (A @ y1), atol=1e-15)


def test_cifar_schedule_as_a_torch_scheduler():
    assert [cifar_schedule(s) for s in (0, 499, 500, 399_999, 400_000)] == [0.25, 0.25, 1.0, 1.0, 0.5]

    def make(flat):
        st = ODEStepper(flat, "euler", h=0.4)
        sched = LambdaLR(st, lambda step: 0.25 if step == 0 else 1.0)
        return lambda closure: (st.step(closure), sched.step())

    _two_euler_steps(make)


@pytest.mark.parametrize("method", sorted(TABLEAUS))
@pytest.mark.parametrize("reg_at", ["first_stage", "after_step"])
def test_the_coefficients_written_on_the_device_are_the_tableau_rows(method, reg_at):
    """A change of h is written into the coefficient tensor from Python scalars (no copy from host memory: no host
    sync under CUDA); the values are exactly tableau.stage_rows' (float64 products, rounded once)."""
    from odegan_kernels.ode.tableau import stage_rows

    M, th, ph = _bilinear_game(torch.float32)
    flat = FlatParams([[th], [ph]], names=["D", "G"], dtype=torch.float32)
    if reg_at == "first_stage" and TABLEAUS[method].b[0] == 0:
        return  # refused (tested elsewhere): g_reg cannot be folded into a stage of no weight
    st = ODEStepper(flat, method, h=0.1, reg=0.07, reg_at=reg_at)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        hs = [float(x) for x in torch.rand(2, generator=gen, dtype=torch.float64) * 0.3 + 1e-3]
        st.h = hs
        e = {0: st.reg_weight} if reg_at == "after_step" else {}
        want = torch.tensor(stage_rows(compile_tableau(TABLEAUS[method]), hs, e), dtype=torch.float32)
        assert torch.equal(st.coefficients(), want)


def test_stepper_is_a_torch_optimizer():
    """param groups per player with h as lr, torch schedulers, hooks, zero_grad, and h changes that take effect."""
    A = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    y, flat, closure = linear_setup(A, y0)
    st = ODEStepper(flat, "euler", h=0.1)
    assert isinstance(st, torch.optim.Optimizer)
    assert [g["lr"] for g in st.param_groups] == [0.1] and st.param_groups[0]["params"] == flat.parameters(0)
    sched = torch.optim.lr_scheduler.StepLR(st, step_size=1, gamma=0.5)
    calls = []
    st.register_step_post_hook(lambda opt, args, kwargs: calls.append(opt.h[0]))
    hs = []
    for _ in range(3):
        before = y.detach().clone()
        st.step(closure)
        v = A @ before  # Euler: y - before = h v
        hs.append(((y.detach() - before) @ v / (v @ v)).item())
        sched.step()
    assert hs == pytest.approx([0.1, 0.05, 0.025], rel=1e-12) and calls == pytest.approx([0.1, 0.05, 0.025])
    st.h = 0.3  # a plain assignment takes effect at the next step too
    before = y.detach().clone()
    st.step(closure)
    assert torch.allclose(y.detach(), before + 0.3 * (A @ before), atol=1e-15)
    y.grad.fill_(1.0)
    st.zero_grad()
    assert y.grad.abs().sum() == 0 and y.grad.data_ptr() == flat.grads.data_ptr()  # still the flat buffer's view
    with pytest.raises(ValueError, match="positive"):
        st.h = -1.0
    with pytest.raises(TypeError, match="must be a number"):
        ODEStepper(flat, h="0.1")
    with pytest.raises(TypeError, match="must be a number"):
        ODEStepper(flat, h=torch.tensor(0.1))
    with pytest.raises(ValueError, match="build a new one"):
        st.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    with pytest.raises(TypeError, match="needs a closure"):
        st.step()


def test_state_dict_round_trips_through_torch_format():
    y, flat, closure = linear_setup(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    st = ODEStepper(flat, "rk4", h=[0.3], reg=0.0)
    st.step(closure)
    state = st.state_dict()
    assert set(state) == {"state", "param_groups", "ode"} and state["param_groups"][0]["lr"] == 0.3
    other = ODEStepper(flat, "rk4", h=0.1)
    other.load_state_dict(state)
    assert other.steps == 1 and other.h == [0.3]
    old = {"steps": 7, "h": [0.2], "reg": 0.0, "method": "rk4", "penalty": "first_stage", "coupling": "joint"}
    with pytest.raises(ValueError, match="not an ODEStepper state_dict of odegan-kernels 0.3.*migrate_checkpoint"):
        other.load_state_dict(old)  # the format of 0.1: read through train.migrate_checkpoint
    assert other.steps == 1


def test_user_writes_between_steps_are_seen():
    """load_state_dict (or any in-place write through the parameters) moves the next step's start."""
    A = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    y, flat, closure = linear_setup(A, torch.tensor([1.0, 0.0], dtype=torch.float64))
    st = ODEStepper(flat, "rk4", h=0.1)
    st.step(closure)
    with torch.no_grad():
        y.copy_(torch.tensor([0.0, 2.0], dtype=torch.float64))
    st.step(closure)
    expected = dense_step_matrix(TABLEAUS["rk4"], A, 0.1) @ torch.tensor([0.0, 2.0], dtype=torch.float64)
    assert torch.allclose(y.detach(), expected, atol=1e-14)


def _bilinear_game(dtype=torch.float64):
    """l_D = theta^T M phi, l_G = -theta^T M phi + quadratic: a linear field with cross-coupling."""
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(3, 2, generator=gen, dtype=dtype)
    th = nn.Parameter(torch.randn(3, generator=gen, dtype=dtype))
    ph = nn.Parameter(torch.randn(2, generator=gen, dtype=dtype))
    return M, th, ph


def test_decoupled_coupling_freezes_the_other_player():
    M, th, ph = _bilinear_game()
    th0, ph0 = th.detach().clone(), ph.detach().clone()
    flat = FlatParams([[th], [ph]], names=["D", "G"], dtype=torch.float64)
    calls = []

    def closure(stage):
        calls.append(stage.players)
        # grad_theta l_D = M phi ; grad_phi l_G = -M^T theta
        th.grad.copy_(M @ ph.detach())
        ph.grad.copy_(-(M.T @ th.detach()))
        return {}

    ODEStepper(flat, "heun", h=0.1, coupling="decoupled").step(closure)
    assert calls == [(0, 1), (0,), (1,)]
    # theta integrates d theta/dt = -M phi0 (phi frozen): constant field, Heun gives theta0 - h M phi0.
    assert torch.allclose(th.detach(), th0 - 0.1 * (M @ ph0), atol=1e-14)
    assert torch.allclose(ph.detach(), ph0 + 0.1 * (M.T @ th0), atol=1e-14)


def _penalty_game():
    """l_D = 0.5|theta|^2 (harmless), l_G = 0.5|phi - W theta|^2: ||dl_G/dphi||^2 = |phi - W theta|^2."""
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    th = nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))
    ph = nn.Parameter(torch.randn(2, generator=gen, dtype=torch.float64))
    flat = FlatParams([[th], [ph]], names=["D", "G"], dtype=torch.float64)

    def closure(stage):
        ld = 0.5 * th.square().sum()
        lg = 0.5 * (ph - W @ th).square().sum()
        ld.backward(inputs=[th])
        out = StageResult()
        if "g_reg" in stage.penalties:
            (gph,) = torch.autograd.grad(lg, [ph], create_graph=True)
            ph.grad.add_(gph.detach())
            out.terms["g_reg"] = PenaltyTerm((0,), gph.square().sum())
        else:
            lg.backward(inputs=[ph])
        return out

    def g_reg(t, p):  # grad_theta |p - W t|^2 = -2 W^T (p - W t)
        return -2 * W.T @ (p - W @ t)

    return W, th, ph, flat, closure, g_reg


def test_penalty_after_step_is_applied_after_the_step():
    W, th, ph, flat, closure, g_reg = _penalty_game()
    th0, ph0 = th.detach().clone(), ph.detach().clone()
    h, lam = 0.1, 0.3
    ODEStepper(flat, "euler", h=h, reg=lam, reg_at="after_step").step(closure)
    assert torch.allclose(th.detach(), th0 - h * th0 - h * lam * g_reg(th0, ph0), atol=1e-14)
    assert torch.allclose(ph.detach(), ph0 - h * (ph0 - W @ th0), atol=1e-14)


def test_penalty_first_stage_is_seen_by_stage_points():
    W, th, ph, flat, closure, g_reg = _penalty_game()
    th0, ph0 = th.detach().clone(), ph.detach().clone()
    h, lam = 0.1, 0.3
    ODEStepper(flat, "heun", h=h, reg=lam, reg_at="first_stage").step(closure)
    # Heun: k1 = g(x0) + (lam / b1) r ; x1 = x0 - h k1 ; x = x0 - h/2 (k1 + g(x1))
    k1t = th0 + (lam / 0.5) * g_reg(th0, ph0)
    k1p = ph0 - W @ th0
    t1, p1 = th0 - h * k1t, ph0 - h * k1p
    assert torch.allclose(th.detach(), th0 - h / 2 * (k1t + t1), atol=1e-14)
    assert torch.allclose(ph.detach(), ph0 - h / 2 * (k1p + (p1 - W @ t1)), atol=1e-14)


def test_state_dict_round_trip_and_mismatch():
    y, flat, _ = linear_setup(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    st = ODEStepper(flat, "rk4", h=0.3, reg=0.0)
    st.steps = 17
    st2 = ODEStepper(flat, "rk4", h=0.1)
    st2.load_state_dict(st.state_dict())
    assert st2.steps == 17 and st2.h == [0.3]
    with pytest.raises(ValueError, match="method='rk4' but this stepper has method='heun'"):
        ODEStepper(flat, "heun").load_state_dict(st.state_dict())
    assert math.isclose(ODEStepper(flat, "rk4", reg=0.02).reg_weight, 0.12)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_step_leaves_the_parameters_at_the_step_start(exc):
    """A closure that fails mid-step (or Ctrl-C) must not leave the parameters at an RK stage point."""
    A = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    y, flat, closure = linear_setup(A, torch.tensor([1.0, 0.5], dtype=torch.float64))
    st = ODEStepper(flat, "rk4", h=0.1)
    st.step(closure)
    before = y.detach().clone()
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 3:
            raise exc("data loader died")
        closure()

    with pytest.raises(exc, match="data loader died"):
        st.step(failing)
    assert torch.equal(y.detach(), before)
    assert st.steps == 1
    st.step(closure)  # and the next step starts from there
    expected = dense_step_matrix(TABLEAUS["rk4"], A, 0.1) @ before
    assert torch.allclose(y.detach(), expected, atol=1e-14)


def _integrator_buffers(st: ODEStepper) -> int:
    """Elements the stepper holds beyond the model's params and grads (coefficients excluded)."""
    return sum(t.numel() for t in st.buffers())


@pytest.mark.parametrize(
    "coupling,penalty,expected",
    [
        ("joint", "first_stage", 2),  # the CIFAR-10 default: x0 and acc, nothing else
        ("joint", "after_step", 2),  # + D's regulariser gradient (D-sized)
        ("decoupled", "after_step", 4),  # + a stage-point copy and a gradient stash
    ],
)
def test_integrator_memory(coupling, penalty, expected):
    M, th, ph = _bilinear_game()
    flat = FlatParams([[th], [ph]], names=["D", "G"], dtype=torch.float64)
    st = ODEStepper(flat, "rk4", h=0.1, reg=0.1, reg_at=penalty, coupling=coupling)

    def closure(stage):
        th.grad.copy_(M @ ph.detach())
        ph.grad.copy_(-(M.T @ th.detach()))
        return StageResult(terms={"g_reg": PenaltyTerm((0,), grad=[torch.zeros_like(th)])} if stage.penalties else {})

    st.step(closure)
    n, d = flat.numel, flat.segment(0)[1]
    extra = d if penalty == "after_step" else 0
    assert _integrator_buffers(st) == expected * n + extra
