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

from .bounds import NUDGE_MARGIN

STEPS = 12
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
    with pytest.raises(ValueError, match="compile must be True, False or .step."):
        ODEStepper(flat, compile="yes")
    with pytest.raises(ValueError, match="compile=True with cuda_graph=True is not supported"):
        ODEStepper(flat, compile=True, cuda_graph=True)
    from odegan_kernels.train import make_config

    with pytest.raises(ValueError, match="use optimizer=ode"):
        make_config("mog-adam", compile=True)
    with pytest.raises(TypeError, match="option compile expects true or false"):
        make_config("mog", compile="maybe")
    from odegan_kernels.game import AutogradEngine

    eng, why = compile_engine(AutogradEngine(D, G), ["g_reg"])
    assert eng.name == "autograd" and "reg_method='double_backward' differentiates a gradient" in why
    assert "\n" not in why
    eng, why = compile_engine(AutogradEngine(D, G, reg_method="finite_difference"), ["g_reg", "r1"])
    assert eng.name == "autograd" and "('r1',) differentiate a gradient" in why
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


def test_the_trainer_option_traces_the_hand_derived_step_and_says_when_it_cannot(tmp_path):
    from odegan_kernels.train import Trainer, make_config

    tr = Trainer(make_config("mog", out=str(tmp_path / "a"), progress=False, compile=True))
    assert tr.game_closure.engine.name == "mlp" and tr.game_closure.traced and tr.opt.compiled_step is not None
    with pytest.warns(UserWarning, match="compile=true leaves the autograd engine's passes eager: g_reg by"):
        tr = Trainer(make_config("mog", out=str(tmp_path / "b"), progress=False, compile=True, grads="autograd"))
    assert tr.game_closure.engine.name == "autograd" and not tr.game_closure.traced
    assert tr.opt.compiled is not None and tr.opt.compiled_step is None  # the stage op alone
    plain = Trainer(make_config("mog", out=str(tmp_path / "c"), progress=False))
    assert plain.opt.compiled is None and plain.opt.compiled_step is None


# -- compile="step": the whole step traced as one graph ---------------------------------------------------------
TRACED = [("rk4", "joint", "first_stage"), ("rk4", "decoupled", "after_step"), ("heun", "decoupled", "first_stage")]


@pytest.mark.parametrize("method,coupling,reg_at", TRACED)
def test_the_traced_step_agrees_with_eager_and_compiles_once(method, coupling, reg_at, input_rebuilds):
    """compile="step" with the hand-derived engine: one graph for the whole step, traced at the second step (the
    first runs eagerly), never again while h changes at every step; float64 within the nudge's tolerance. Its inputs
    do not alias (TracedBuffers), so no call rebuilds them (before, every step did: 17 steps, 17 rebuilds)."""
    hs = [0.1 * (1 + 0.05 * i) for i in range(STEPS)]
    eager, _ = _run(method, coupling, reg_at, hs=hs)
    nudged, _ = _run(method, coupling, reg_at, hs=hs, nudge=True)
    traced, graphs = _run(method, coupling, reg_at, compile="step", hs=hs, engine=MLPPair)
    assert input_rebuilds == []
    assert torch.isfinite(traced).all()
    assert graphs[0] == graphs[1] - 1 and graphs[2:] == [graphs[1]] * (STEPS - 2), graphs
    assert _rel(traced, eager) <= NUDGE_MARGIN * max(_rel(nudged, eager), 1e-15), _rel(traced, eager)
    other = _run(method, coupling, reg_at, hs=[h * (1 + 1e-6) for h in hs])[0]
    assert _rel(traced, other) > NUDGE_MARGIN * max(_rel(nudged, eager), 1e-15)  # the check can fail


@pytest.mark.parametrize("coupling", ["joint", "decoupled"])
def test_a_traced_step_with_scalar_frozen_and_empty_parameters_equals_eager(coupling, input_rebuilds):
    """The traced step's per-parameter stage op (TracedBuffers) on parameters of every shape FlatParams takes: a
    0-dim one, an empty one, a matrix, beside a tensor the closure reads that is no parameter; the eager step's in
    float64 within the nudge's tolerance (measured 2.2e-16 after 4 steps: Inductor's tanh/sin/cos against eager's,
    an ulp), and no call rebuilds an input."""

    def run(compile, nudge=False):
        torch.manual_seed(0)
        D = [torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(0, 3,
             dtype=torch.float64)), torch.nn.Parameter(torch.randn(2, 3, dtype=torch.float64))]  # fmt: skip
        G = [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
        frozen = torch.randn(3, dtype=torch.float64)
        flat = FlatParams(D=D, G=G, dtype=torch.float64)
        if nudge:
            with torch.no_grad():
                flat.params.copy_(torch.nextafter(flat.params, torch.full_like(flat.params, float("inf"))))
        st = ODEStepper(flat, "rk4", h=0.1, coupling=coupling, compile=compile, backend="foreach")

        @torch.no_grad()
        def closure(stage):
            D[0].grad.add_(torch.tanh(D[0] * G[0].sum()))
            D[2].grad.add_(torch.sin(D[2] * G[0] + frozen))
            G[0].grad.add_(-torch.cos(D[2].sum(0) * G[0]) * D[0])

        start = flat.params.clone()
        for _ in range(4):
            st.step(closure)
        assert int((flat.params != start).sum()) == 10  # every parameter's every element moved (the rest: padding)
        return flat.params.clone()

    eager, nudged, traced = run(False), run(False, nudge=True), run("step")
    assert torch.isfinite(traced).all()
    tol = NUDGE_MARGIN * max(_rel(nudged, eager), 1e-15)
    assert _rel(traced, eager) <= tol, (_rel(traced, eager), tol)
    assert input_rebuilds == []


def _small_game(compile, pens=(("r1", (0.5, 2)),), steps=8, nudge=False):
    """A smooth game written out (gradients and R1's as plain tensor arithmetic, R1 given as its gradient): cheap to
    trace. Returns (parameters after ``steps``, the process's compiled-graph count after each step)."""
    from odegan_kernels.contract import PenaltyTerm, StageResult

    torch.manual_seed(0)
    D, G = torch.nn.Linear(3, 2, dtype=torch.float64), torch.nn.Linear(2, 3, dtype=torch.float64)
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    if nudge:
        with torch.no_grad():
            flat.params.copy_(torch.nextafter(flat.params, torch.full_like(flat.params, float("inf"))))
    st = ODEStepper(flat, "rk4", h=0.05, penalties=dict(pens or ()), compile=compile, backend="foreach")

    @torch.no_grad()
    def closure(stage):
        D.weight.grad.add_(torch.tanh(G.weight.sum() * D.weight))
        G.weight.grad.add_(-torch.sin(D.weight.sum() * G.weight))
        terms = {}
        if "r1" in stage.penalties:
            terms["r1"] = PenaltyTerm((0,), grad=[2 * D.weight, 2 * D.bias])
        return StageResult(terms=terms)

    counts = []
    for _ in range(steps):
        st.step(closure)
        counts.append(counters["stats"]["unique_graphs"])
    return flat.params.clone(), counts


def test_a_traced_step_has_a_graph_per_kind_of_step_and_the_lazy_penalty_lands():
    """A lazy penalty (every 2nd step) makes two kinds of step: two graphs, each replayed at its own steps; the
    result equals the eager stepper's."""
    run = _small_game
    eager, _ = run(False)
    traced, counts = run("step")
    assert counts[2] - counts[0] == 2 and counts[3:] == [counts[2]] * 5, counts  # steps 1 and 2: the two kinds
    nudged, _ = run(False, nudge=True)
    assert _rel(traced, eager) <= NUDGE_MARGIN * max(_rel(nudged, eager), 1e-15), _rel(traced, eager)
    assert _rel(run(False, pens=None)[0], eager) > 1e-6  # the lazy penalty moved the run: it was applied


def test_each_stepper_has_its_own_graphs_and_the_limit_is_said_in_one_line():
    """Dynamo's limit of graphs per code object counts one stepper's graphs, not the process's: with the limit at 1,
    two steppers each trace their step (one kind each); a stepper with two kinds of step (a lazy penalty) is then
    refused in one line naming the limit."""
    with torch._dynamo.config.patch(recompile_limit=1):
        for _ in range(2):
            _, counts = _small_game("step", pens=None, steps=3)
            assert counts[1] - counts[0] == 1 and counts[2] == counts[1], counts
        with pytest.raises(RuntimeError, match="compiled 1 graphs .*recompile_limit") as err:
            _small_game("step", steps=3)
    assert "\n" not in str(err.value)


def test_a_closure_the_trace_cannot_take_is_refused_in_one_line_and_the_step_undone():
    D, G = mog_pair(hidden=4, z_dim=2, dtype=torch.float64)
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    st = ODEStepper(flat, "euler", h=0.1, compile="step")
    gen = torch.Generator().manual_seed(0)

    def closure(stage):  # draws inside: a torch.Generator cannot be traced
        x = torch.randn(8, 2, generator=gen, dtype=torch.float64)
        z = torch.randn(8, 2, generator=gen, dtype=torch.float64)
        return MLPPair(D, G)(Batch(x, z), stage.players, stage.penalties)

    st.step(closure)  # the first step runs eagerly
    before = flat.params.clone()
    with pytest.raises(RuntimeError, match="cannot be traced") as err:
        st.step(closure)
    assert "\n" not in str(err.value) and "compile=True" in str(err.value)
    assert torch.equal(flat.params, before) and st.steps == 1 and st.rolled_back
    with pytest.raises(ValueError, match="compile='step' with cuda_graph=True is not supported"):
        ODEStepper(flat, compile="step", cuda_graph=True)


TRAINER_CASES = [
    ("mog", {}),  # the main job: decoupled, one batch per step, g_reg after the step
    ("mog-joint", {}),  # joint, a fresh batch per stage, g_reg in the first stage
    ("mog", {"data_per_stage": "fresh", "instance_noise": 0.1, "instance_noise_anneal": 10}),  # 7 draws a step
]


@pytest.mark.parametrize("preset,opts", TRAINER_CASES)
def test_the_trainers_traced_step_agrees_with_its_eager_step_in_float64(tmp_path, preset, opts):
    """compile=true in float64: the data (and instance noise) drawn before each step in the eager order, so the traced
    run follows the eager one to rounding; one graph is compiled (the trainer traces its first step)."""
    from odegan_kernels.train import Trainer, make_config

    def run(name, compile, nudge=False, steps=20):
        cfg = make_config(preset, out=str(tmp_path / name), progress=False, compile=compile, dtype="float64", **opts)
        tr = Trainer(cfg)
        if nudge:
            with torch.no_grad():
                tr.flat.params.copy_(torch.nextafter(tr.flat.params, torch.full_like(tr.flat.params, float("inf"))))
        for _ in range(steps):
            tr.train_step()
        return tr, tr.flat.params.clone()

    _, eager = run("e", False)
    _, nudged = run("n", False, nudge=True)
    before = counters["stats"]["unique_graphs"]
    tr, traced = run("t", True)
    assert tr.opt.compiled_step is not None and tr.opt.steps == 20
    assert counters["stats"]["unique_graphs"] == before + 1  # traced, once: not eager pieces, no recompiles
    assert _rel(traced, eager) <= NUDGE_MARGIN * max(_rel(nudged, eager), 1e-15), _rel(traced, eager)


def test_a_predraw_that_disagrees_with_the_step_is_named(tmp_path):
    """The traced step's batches are drawn before it: a step that reads fewer than were drawn would leave the streams
    where the eager step never does, and says so (checked on the eager first step, the same closure path)."""
    from odegan_kernels.train import Trainer, make_config

    tr = Trainer(make_config("mog-joint", out=str(tmp_path / "a"), progress=False, compile=True))
    n = tr.opt.draws_per_step(tr.cfg.data_per_stage)
    assert n == 4 and tr.game_closure.traced
    tr.game_closure.predraw(0, n + 1)
    tr.opt.step(tr.closure)
    with pytest.raises(RuntimeError, match="read 4 of the 5 batches drawn before it"):
        tr.game_closure.check_predrawn()
    assert (
        Trainer(make_config("mog", out=str(tmp_path / "b"), progress=False, compile=True)).opt.draws_per_step("shared")
        == 1
    )


def test_an_interrupt_after_the_batches_were_drawn_ahead_resumes_exactly(tmp_path):
    """Ctrl-C after predraw drew a step's batches but before the step ran: the streams go back to the step's start
    (as for an undone step), so the resumed run equals the uninterrupted one."""
    from odegan_kernels.train import Trainer, TrainingInterrupted, make_config

    opts = dict(steps=4, progress=False, compile=True, eval_every=100, plot_every=100, log_every=2)
    straight = Trainer(make_config("mog-joint", out=str(tmp_path / "a"), **opts))
    straight.run()
    tr = Trainer(make_config("mog-joint", out=str(tmp_path / "b"), **opts))
    inner = tr.game_closure.predraw

    def then_stop(step, n):
        inner(step, n)
        if step == 1:
            raise KeyboardInterrupt

    tr.game_closure.predraw = then_stop
    with pytest.raises(TrainingInterrupted, match="interrupted at step 1"):
        tr.run()
    resumed = Trainer(make_config("mog-joint", out=str(tmp_path / "b"), **opts))
    resumed.run()
    assert resumed.step == 4 and torch.equal(resumed.flat.params, straight.flat.params)


class _TinyConvD(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3, 2, 1, dtype=torch.float64)
        self.out = torch.nn.Linear(3 * 4 * 4, 1, dtype=torch.float64)

    def forward(self, x):
        return self.out(torch.nn.functional.leaky_relu(self.conv(x), 0.2).flatten(1)).squeeze(1)


def _tiny_conv_pair():
    """An image pair small enough to compile in seconds: D convolutional, G with BatchNorm in training mode."""
    torch.manual_seed(0)
    G = torch.nn.Sequential(
        torch.nn.Linear(4, 4 * 4 * 4, dtype=torch.float64),
        torch.nn.Unflatten(1, (4, 4, 4)),
        torch.nn.BatchNorm2d(4, dtype=torch.float64),
        torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(4, 1, 4, 2, 1, dtype=torch.float64),
        torch.nn.Tanh(),
    )
    return _TinyConvD(), G


def test_compiled_players_of_an_image_pair_agree_with_eager_in_float64():
    """The autograd engine with first-order passes only (g_reg by finite differences) runs its players as compiled
    modules: a conv pair with BatchNorm, RK4 joint with g_reg in the first stage, against the eager players within
    the nudge's tolerance; BN's running statistics too; nothing recompiles after the first step."""
    from odegan_kernels.game import AutogradEngine

    gen = torch.Generator().manual_seed(3)
    data = [(torch.rand(8, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1,
             torch.randn(8, 4, generator=gen, dtype=torch.float64)) for _ in range(4)]  # fmt: skip

    def run(compiled, nudge=False):
        D, G = _tiny_conv_pair()
        flat = FlatParams(D=D, G=G, dtype=torch.float64)
        if nudge:
            with torch.no_grad():
                flat.params.copy_(torch.nextafter(flat.params, torch.full_like(flat.params, float("inf"))))
        eng = AutogradEngine(D, G, reg_method="finite_difference")
        if compiled:
            eng, why = compile_engine(eng, ["g_reg"])
            assert why is None and eng.name == "autograd+compile"
        st = ODEStepper(flat, "rk4", h=0.05, reg=0.1, reg_at="first_stage", coupling="joint", backend="foreach")
        graphs = []
        for x, z in data:
            st.step(lambda stage, x=x, z=z: eng(Batch(x, z), stage.players, stage.penalties))
            graphs.append(counters["stats"]["unique_graphs"])
        return torch.cat([flat.params, G[2].running_mean, G[2].running_var]), graphs

    eager, _ = run(False)
    nudged, _ = run(False, nudge=True)
    compiled, graphs = run(True)
    assert torch.isfinite(compiled).all()
    assert graphs[0] > 0 and graphs[1:] == [graphs[0]] * 3, graphs
    assert _rel(compiled, eager) <= NUDGE_MARGIN * max(_rel(nudged, eager), 1e-15), _rel(compiled, eager)


def test_the_trainer_compiles_an_image_pairs_players_when_its_passes_are_first_order(tmp_path):
    """compile=true on the digits preset (a conv pair with BatchNorm, autograd engine): with g_reg by finite
    differences the players run compiled and train; with the preset's double backward they stay eager, said in one
    line."""
    pytest.importorskip("sklearn", reason="the digits need scikit-learn (the [dev] and [digits] extras)")
    from odegan_kernels.train import Trainer, make_config

    opts = dict(progress=False, compile=True, width=4, batch=8, eval_samples=64)
    tr = Trainer(make_config("digits", out=str(tmp_path / "a"), reg_method="finite_difference", **opts))
    assert tr.game_closure.engine.name == "autograd+compile" and not tr.game_closure.traced
    start = tr.flat.params.clone()
    for _ in range(2):
        tr.train_step()
    assert torch.isfinite(tr.flat.params).all() and not torch.equal(tr.flat.params, start)
    with pytest.warns(UserWarning, match="g_reg by reg_method='double_backward' differentiates a gradient"):
        tr = Trainer(make_config("digits", out=str(tmp_path / "b"), **opts))
    assert tr.game_closure.engine.name == "autograd"
