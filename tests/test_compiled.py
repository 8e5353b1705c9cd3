"""compile=True (issue 21): the compiled step agrees with the eager one in float64, every method, coupling and
placement, to a tolerance from a measured sensitivity; a change of h or lambda between steps compiles nothing new;
options it cannot run with are refused in one line.

The tolerance: the same run's distance from itself with its start point nudged by one ulp (NUDGE_MARGIN x that,
floored at the float64 rounding of the parameters' scale): a compiled step rounds differently from the eager one
in the last bits (other fused orders of the same products), and the game amplifies that as it amplifies a nudge.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from odegan_kernels import Batch, FlatParams, ODEStepper, game_gradients
from odegan_kernels.game import MLPPair
from odegan_kernels.game.compiled import CompiledEngine, compile_engine
from odegan_kernels.models import mog_pair
from odegan_kernels.ode import TABLEAUS

STEPS = 12
NUDGE_MARGIN = 30
CASES = [
    (m, c, p)
    for m in TABLEAUS
    for c in ("joint", "decoupled")
    for p in ("first_stage", "after_step")
    if not (p == "first_stage" and TABLEAUS[m].b[0] == 0)
]


def _run(method, coupling, reg_at, compile=False, engine=None, nudge=False, hs=None):
    torch.manual_seed(0)
    D, G = mog_pair(hidden=16, z_dim=8, dtype=torch.float64)
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    if nudge:
        with torch.no_grad():
            flat.params.copy_(torch.nextafter(flat.params, torch.full_like(flat.params, float("inf"))))
    gen = torch.Generator().manual_seed(1)
    f64 = dict(generator=gen, dtype=torch.float64)
    data = [(torch.randn(64, 2, **f64), torch.randn(64, 8, **f64)) for _ in range(STEPS)]
    st = ODEStepper(flat, method, h=0.1, reg=0.07, reg_at=reg_at, coupling=coupling, compile=compile)
    eng = engine(D, G) if engine is not None else None
    graphs = []
    for i, (x, z) in enumerate(data):
        if hs is not None:
            st.h = hs[i]
            st.reg = 0.07 * (1 + i / 10)

        def closure(stage):
            b = Batch(x, z)
            if eng is not None:
                return eng(b, stage.players, stage.penalties, losses=stage.index == 0)
            return game_gradients(D, G, b, players=stage.players, penalties=stage.penalties, engine="mlp")

        st.step(closure)
        graphs.append(counters["stats"]["unique_graphs"])
    return flat.params.clone(), graphs


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method,coupling,reg_at", CASES)
def test_the_compiled_stage_op_agrees_with_the_eager_step_in_float64(method, coupling, reg_at):
    eager, _ = _run(method, coupling, reg_at)
    nudged, _ = _run(method, coupling, reg_at, nudge=True)
    compiled, _ = _run(method, coupling, reg_at, compile=True)
    tol = NUDGE_MARGIN * max(_rel(nudged, eager), 1e-15)
    assert torch.isfinite(compiled).all()
    assert _rel(compiled, eager) <= tol, (
        f"{method} {coupling} {reg_at}: compiled is {_rel(compiled, eager):.2e} from eager after {STEPS} steps; "
        f"a one-ulp nudge moves it {_rel(nudged, eager):.2e}"
    )
    assert not torch.equal(compiled, _run(method, coupling, reg_at, hs=[0.1 * (1 + 1e-6)] * STEPS)[0])


def test_a_change_of_h_and_lambda_between_steps_compiles_nothing_new():
    hs = [0.1 * (1 + 0.05 * i) for i in range(STEPS)]
    eager, _ = _run("rk4", "decoupled", "after_step", hs=hs)
    compiled, graphs = _run("rk4", "decoupled", "after_step", compile=True, hs=hs)
    assert graphs[1:] == [graphs[0]] * (STEPS - 1), f"graphs compiled after each step: {graphs}"
    assert _rel(compiled, eager) < 1e-12


def test_options_compile_cannot_run_with_are_refused_in_one_line():
    D, G = mog_pair(hidden=4, z_dim=2, dtype=torch.float64)
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    with pytest.raises(ValueError, match="compile must be True or False"):
        ODEStepper(flat, compile="yes")
    with pytest.raises(ValueError, match="compile=True with cuda_graph=True is not supported"):
        ODEStepper(flat, compile=True, cuda_graph=True)
    from odegan_kernels.train import make_config

    with pytest.raises(ValueError, match="use optimizer=ode"):
        make_config("mog-adam", compile=True)
    with pytest.raises(TypeError, match="option compile expects true or false"):
        make_config("mog", compile="maybe")
    from odegan_kernels.game import AutogradEngine

    eng, why = compile_engine(AutogradEngine(D, G))
    assert isinstance(eng, AutogradEngine) and "run eagerly" in why and "\n" not in why
    with pytest.raises(TypeError, match="MLPPair"):
        CompiledEngine(AutogradEngine(D, G))


@pytest.mark.slow
@pytest.mark.parametrize("coupling,reg_at", [("decoupled", "after_step"), ("joint", "first_stage")])
def test_the_whole_compiled_step_agrees_with_eager_and_compiles_only_at_its_first_step(coupling, reg_at):
    """The engine compiled too (the hand-derived gradients and g_reg): about a minute of compiling per case here."""
    hs = [0.1 * (1 + 0.05 * i) for i in range(STEPS)]
    eager, _ = _run("rk4", coupling, reg_at, hs=hs)
    nudged, _ = _run("rk4", coupling, reg_at, hs=hs, nudge=True)
    compiled, graphs = _run(
        "rk4", coupling, reg_at, compile=True, hs=hs, engine=lambda D, G: CompiledEngine(MLPPair(D, G))
    )
    assert graphs[1:] == [graphs[0]] * (STEPS - 1), f"graphs compiled after each step: {graphs}"
    assert _rel(compiled, eager) <= NUDGE_MARGIN * max(_rel(nudged, eager), 1e-15), _rel(compiled, eager)


def test_the_trainer_option_compiles_the_hand_derived_engine_and_says_when_it_cannot(tmp_path):
    from odegan_kernels.train import Trainer, make_config

    tr = Trainer(make_config("mog", out=str(tmp_path / "a"), progress=False, compile=True))
    assert tr.game_closure.engine.name == "mlp+compile" and tr.opt.compiled is not None
    with pytest.warns(UserWarning, match="the autograd engine's autograd passes run eagerly"):
        tr = Trainer(make_config("mog", out=str(tmp_path / "b"), progress=False, compile=True, grads="autograd"))
    assert tr.game_closure.engine.name == "autograd"
    assert Trainer(make_config("mog", out=str(tmp_path / "c"), progress=False)).opt.compiled is None
