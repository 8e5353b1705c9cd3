"""The penalty family inside the optimisers: the ODE stepper (joint and decoupled, every stage, lazy intervals), the
Adam/SGD baselines, and the trainer's options, each against a step written out by hand from the same field."""

from __future__ import annotations

import pytest
import torch

from odegan_kernels import Batch, FlatParams, ODEStepper, Stage, StageResult, game_gradients
from odegan_kernels.contract import PENALTIES, Penalty, apply_penalties, penalty_specs
from odegan_kernels.models import mog_pair
from odegan_kernels.models.resnet128 import ConditionalResNetDiscriminator, ConditionalResNetGenerator
from odegan_kernels.train import Config, Trainer, make_config
from odegan_kernels.train.baselines import BaselineOptimizer

FIELD_PENALTIES = {k: v for k, v in PENALTIES.items() if k != "g_reg"}
RK4 = ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)
EULER = ((),), (1.0,)


def _setup(seed=0):
    D, G = mog_pair(z_dim=4, hidden=8, seed=seed)
    D, G = D.double(), G.double()
    flat = FlatParams(D=D, G=G, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    real, z = (
        torch.randn(16, 2, generator=gen, dtype=torch.float64),
        torch.randn(16, 4, generator=gen, dtype=torch.float64),
    )
    mix = torch.rand(16, generator=gen, dtype=torch.float64)
    return D, G, flat, real, z, mix


def _closure(D, G, real, z, mix, calls=None):
    def closure(stage):
        if calls is not None:
            calls.append(stage)
        return game_gradients(D, G, Batch(real, z, mix=mix), players=stage.players, penalties=stage.penalties)

    return closure


def _field(flat, D, G, real, z, mix, weights, players=(0, 1)):
    """The regularised field's gradient part at the current parameters: g + sum_i w_i grad P_i (one flat vector)."""
    names = tuple(n for n in weights if n != "g_reg" and set(FIELD_PENALTIES[n]) & set(players))
    names += ("g_reg",) if "g_reg" in weights else ()
    flat.zero_grad()
    res = game_gradients(D, G, Batch(real, z, mix=mix), players=players, penalties=names)
    kept = {n: w for n, w in weights.items() if n in names}
    apply_penalties(res, flat, kept, players=players)
    return flat.grads.clone()


def _reference_step(flat, D, G, real, z, mix, h, weights, tableau, coupling="joint"):
    """One explicit RK step of the regularised field written out (g_reg weights as given, at stage 1 only)."""
    A, b = tableau
    x0 = flat.params.clone()
    segs = flat.segments
    ks = []
    for i in range(len(b)):
        w_i = {n: w for n, w in weights.items() if n != "g_reg" or i == 0}
        if i == 0 or coupling == "joint":
            with torch.no_grad():
                flat.params.copy_(x0 - h * sum(a * k for a, k in zip(A[i], ks)) if i else x0)
            ks.append(_field(flat, D, G, real, z, mix, w_i))
            continue
        k = torch.zeros_like(x0)
        for q, (lo, hi) in enumerate(segs):  # each player at its own stage point, the other at the step's start
            point = x0 - h * sum(a * kk for a, kk in zip(A[i], ks))
            with torch.no_grad():
                flat.params.copy_(x0)
                flat.params[lo:hi] = point[lo:hi]
            k[lo:hi] = _field(flat, D, G, real, z, mix, w_i, players=(q,))[lo:hi]
        ks.append(k)
    with torch.no_grad():
        flat.params.copy_(x0 - h * sum(bb * k for bb, k in zip(b, ks)))
    return flat.params.clone()


@pytest.mark.parametrize("coupling", ["joint", "decoupled"])
@pytest.mark.parametrize("names", [("r1",), ("r2",), ("wgan_gp",), ("consensus",), tuple(FIELD_PENALTIES)])
def test_rk4_step_applies_the_penalties_at_every_stage(names, coupling):
    weights = {n: 0.3 + 0.1 * i for i, n in enumerate(names)}
    h, lam = 0.05, 0.2
    D, G, flat, real, z, mix = _setup()
    st = ODEStepper(flat, "rk4", h=h, reg=lam, coupling=coupling, penalties=weights)
    calls = []
    cl = _closure(D, G, real, z, mix, calls)
    start = flat.params.clone()
    st.step(cl)
    got = flat.params.clone()
    field = [
        set(c.penalties) - {"g_reg"} == {n for n in names if set(FIELD_PENALTIES[n]) & set(c.players)} for c in calls
    ]
    assert all(field) and [("g_reg" in c.penalties) for c in calls] == [c.index == 0 for c in calls]
    assert len(calls) == (4 if coupling == "joint" else 1 + 3 * 2)
    with torch.no_grad():
        flat.params.copy_(start)
    want = _reference_step(flat, D, G, real, z, mix, h, {"g_reg": lam / (1 / 6), **weights}, RK4, coupling)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    with torch.no_grad():
        flat.params.copy_(start)
    plain = _reference_step(flat, D, G, real, z, mix, h, {"g_reg": lam / (1 / 6)}, RK4, coupling)
    assert (got - plain).abs().max() > 1e-6, "the penalties must move the step"


def test_lazy_penalty_every_k_steps_with_k_scaling():
    D, G, flat, real, z, mix = _setup()
    st = ODEStepper(flat, "euler", h=0.05, penalties=[Penalty("r1", 0.5, every=3)])
    calls = []
    cl = _closure(D, G, real, z, mix, calls)
    start = want = flat.params.clone()
    for step in range(7):
        with torch.no_grad():
            flat.params.copy_(want)
        weights = {"r1": 1.5} if step % 3 == 0 else {}
        want = _reference_step(flat, D, G, real, z, mix, 0.05, weights, EULER)
    with torch.no_grad():
        flat.params.copy_(start)
    for _ in range(7):
        st.step(cl)
    assert [dict(c.penalties) for c in calls] == [{"r1": 1.5} if s % 3 == 0 else {} for s in range(7)]
    torch.testing.assert_close(flat.params, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_baselines_take_the_same_penalty_path(kind):
    D, G, flat, real, z, mix = _setup()
    opt = BaselineOptimizer(flat, kind, lr=0.01, reg=0.2, penalties={"r1": 1.0, "consensus": 0.1})
    start = flat.params.clone()
    out = opt.step(_closure(D, G, real, z, mix))
    assert set(out.terms) == {"r1", "consensus", "g_reg"} and out.value("g_reg") is not None
    got = flat.params.clone()
    with torch.no_grad():
        flat.params.copy_(start)
    k = _field(flat, D, G, real, z, mix, {"g_reg": 0.2, "r1": 1.0, "consensus": 0.1})
    if kind == "sgd":
        torch.testing.assert_close(got, start - 0.01 * k, rtol=1e-12, atol=1e-14)
    else:  # Adam's first step moves each coordinate by lr * sign(grad) (up to eps)
        big = k.abs() > 1e-3
        torch.testing.assert_close((start - got)[big], 0.01 * torch.sign(k[big]), rtol=1e-4, atol=1e-9)


def test_refusals():
    D, G, flat, *_ = _setup()
    with pytest.raises(ValueError, match="give its weight as reg="):
        penalty_specs({"g_reg": 1.0})
    with pytest.raises(ValueError, match="unknown penalty"):
        penalty_specs({"r3": 1.0})
    with pytest.raises(ValueError, match="every"):
        penalty_specs({"r1": (1.0, 0)})
    with pytest.raises(ValueError, match=">= 0"):
        penalty_specs({"r1": float("nan")})
    st = ODEStepper(flat, "euler", h=0.1, penalties={"r1": 1.0})
    with pytest.raises(TypeError, match="Stage argument"):
        st.step(lambda: None)
    with pytest.raises(TypeError, match=r"asked for penalties \('r1',\) .* closure returned NoneType"):
        st.step(lambda stage: None)
    with pytest.raises(TypeError, match="PenaltyTerm 'r1'"):
        st.step(lambda stage: StageResult())
    assert penalty_specs({"r1": 0.0, "r2": 1}) == (Penalty("r2", 1),)


def test_conditional_pair_steps_with_every_penalty():
    torch.manual_seed(0)
    D = ConditionalResNetDiscriminator(num_classes=3, ch=2, image_size=32)
    G = ConditionalResNetGenerator(z_dim=8, num_classes=3, ch=2, image_size=32)
    flat = FlatParams(D=D, G=G)
    gen = torch.Generator().manual_seed(0)
    real, z = torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1, torch.randn(4, 8, generator=gen)
    y_real, y_fake = torch.randint(3, (4,), generator=gen), torch.randint(3, (4,), generator=gen)
    st = ODEStepper(flat, "rk4", h=0.01, reg=0.02, penalties=dict.fromkeys(FIELD_PENALTIES, 1.0))

    def closure(stage):
        batch = Batch(real, z, y_real, y_fake)
        return game_gradients(D, G, batch, players=stage.players, penalties=stage.penalties, generator=gen)

    start = flat.params.clone()
    out = st.step(closure)
    assert set(out.terms) == {*FIELD_PENALTIES, "g_reg"}
    assert all(torch.isfinite(t.value) for t in out.terms.values()) and torch.isfinite(flat.params).all()
    assert (flat.params - start).abs().max() > 0


# -- the trainer --------------------------------------------------------------------------------------------------
def _trainer(tmp_path, preset="mog-joint", **kw):
    cfg = make_config(
        preset, steps=10, out=str(tmp_path), progress=False, eval_every=10**6, plot_every=10**6, ckpt_every=10**6, **kw
    )
    return Trainer(cfg)


@pytest.mark.parametrize(
    "options",
    [
        dict(r1=1.0),
        dict(r2=1.0),
        dict(wgan_gp=1.0, loss="wasserstein"),
        dict(consensus=0.1),
        dict(r1=4.0, penalty_every=4),
        dict(instance_noise=0.1, instance_noise_anneal=5),
        dict(loss="lsgan", r1=0.5),
        dict(optimizer="sgd", lr=0.01, r2=1.0),
    ],
)
@pytest.mark.parametrize("preset", ["mog", "mog-joint"])  # decoupled + shared data + after-step g_reg, and joint
def test_trainer_options_run_log_and_reproduce(tmp_path, preset, options):
    runs = []
    for i in range(2):
        tr = _trainer(tmp_path / str(i), preset, **options)
        stats = [tr.train_step() for _ in range(5)]
        runs.append(tr.flat.params.clone())
        assert torch.isfinite(runs[-1]).all()
    assert torch.equal(runs[0], runs[1]), "the same options and seed must give the same run (noise from its streams)"
    for name in FIELD_PENALTIES:
        if options.get(name):
            every = options.get("penalty_every", 1)
            assert [name in s for s in stats] == [i % every == 0 for i in range(5)]
    if options.get("instance_noise"):
        assert tr.game_closure.noise_std(0) == 0.1 and tr.game_closure.noise_std(5) == 0.0
    plain = _trainer(
        tmp_path / "plain", preset, **{k: v for k, v in options.items() if k in ("optimizer", "lr", "loss")}
    )
    for _ in range(5):
        plain.train_step()
    assert not torch.equal(plain.flat.params, runs[0]), "the option must change the run"


def test_field_penalties_take_autograd_and_noise_keeps_the_hand_derived_engine(tmp_path):
    assert _trainer(tmp_path, r1=1.0).game_closure.engine.name == "autograd"
    assert _trainer(tmp_path, instance_noise=0.1).game_closure.engine.name == "mlp"
    with pytest.raises(ValueError, match="grads='mlp' cannot run here: the gradient penalties"):
        _trainer(tmp_path, r1=1.0, grads="mlp")


def test_penalty_options_must_match_on_resume():
    keys = Config.resume_keys()
    assert {"r1", "r2", "wgan_gp", "consensus", "penalty_every", "instance_noise", "instance_noise_anneal"} <= set(keys)


# -- graph mode ---------------------------------------------------------------------------------------------------
def test_graph_mode_draws_from_the_default_generator_and_refreshes_the_std(tmp_path):
    """What a captured step needs, checked on the CPU: WGAN-GP's mix and the instance noise come from the
    device's default generator (graphs advance it per replay), not the run's z stream; the annealed std lives in a
    tensor that fill_static(step) refreshes outside the graph."""
    from odegan_kernels.graphs import StaticBatches
    from odegan_kernels.train.closure import GameClosure

    cfg = make_config("mog-joint", out=str(tmp_path), wgan_gp=1.0, instance_noise=0.2, instance_noise_anneal=10)
    tr = Trainer(cfg)
    static = StaticBatches(4, cfg.batch, tr.problem.sample_shape, labels=False, device="cpu")
    cl = GameClosure(cfg, tr.problem, tr.state.streams.data, tr.state.streams.z, static)
    z_state = tr.state.streams.z.get_state()
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        cl.fill_static(step=5)
        cl(Stage(0, 0, (0, 1), {"wgan_gp": 1.0}))
        draws.append((cl.batch.mix.clone(), cl.batch.noise[0].clone()))
    assert torch.equal(tr.state.streams.z.get_state(), z_state), "graph mode must not draw from the run's z stream"
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert cl.sigma.item() == pytest.approx(0.1)  # 0.2 x (1 - 5/10)
    with pytest.raises(ValueError, match="fill_static\\(step\\)"):
        cl.fill_static()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run bench/gpu_check.sh)")
@pytest.mark.parametrize(
    "pens",
    [{"r1": 1.0, "r2": 0.5, "wgan_gp": 1.0, "consensus": 0.1}, {"r1": (1.0, 2), "wgan_gp": (1.0, 3), "r2": 0.5}],
    ids=["every-step", "lazy"],
)
def test_captured_step_with_every_penalty_equals_the_eager_step(pens):
    """Lazy penalties give four kinds of step here (r1 due, wgan_gp due, both, neither): each its own graph, each
    replayed after the others' replays (captured by step 9 with graph_warmup=1; replays to step 17)."""
    gen = torch.Generator().manual_seed(0)
    steps = 18
    data = [torch.randn(4, 128, 2, generator=gen).cuda() for _ in range(steps)]
    zs = [torch.randn(4, 128, 8, generator=gen).cuda() for _ in range(steps)]
    mixes = [torch.rand(4, 128, generator=gen).cuda() for _ in range(steps)]
    results = {}
    for cuda_graph in (False, True):
        torch.manual_seed(0)
        D, G = mog_pair(z_dim=8, hidden=16, seed=0)
        D, G = D.cuda(), G.cuda()
        flat = FlatParams(D=D, G=G)
        st = ODEStepper(flat, "rk4", h=0.05, reg=0.07, penalties=pens, cuda_graph=cuda_graph, graph_warmup=1)
        x, z, mix = data[0].clone(), zs[0].clone(), mixes[0].clone()  # static inputs, refilled per step

        def closure(stage):
            i = stage.index
            batch = Batch(x[i], z[i], mix=mix[i])
            return game_gradients(D, G, batch, players=stage.players, penalties=stage.penalties)

        out = []
        for s in range(steps):
            x.copy_(data[s])
            z.copy_(zs[s])
            mix.copy_(mixes[s])
            st.step(closure)
            out.append(flat.params.clone())
        results[cuda_graph] = out
        if cuda_graph:
            assert st.graph.captured
    for e, g in zip(results[False], results[True]):
        assert torch.isfinite(g).all()
        assert ((g - e).norm() / e.norm()).item() <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run bench/gpu_check.sh)")
@pytest.mark.parametrize("every", [1, 4])
def test_trainer_graph_mode_with_the_penalty_family(tmp_path, every):
    cfg = make_config(
        "mog-joint", device="cuda", cuda_graph=True, steps=40, eval_every=40, log_every=20, plot_every=10**9,
        out=str(tmp_path), progress=False, r1=1.0, wgan_gp=1.0, consensus=0.1, instance_noise=0.05,
        instance_noise_anneal=20, penalty_every=every,
    )  # fmt: skip
    summary = Trainer(cfg).run()
    assert summary["step"] == 40
    rows = [r for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"r1"' in r]
    assert rows and all("nan" not in r.lower() for r in rows)


def test_a_lazy_penalty_is_logged_as_the_mean_over_the_steps_that_computed_it(tmp_path):
    from odegan_kernels.train.logging import IntervalMeans

    tr = _trainer(tmp_path, r1=4.0, penalty_every=4)
    means, r1 = IntervalMeans(), []
    for _ in range(8):
        stats = tr.train_step()
        means.add(stats)
        if "r1" in stats:
            r1.append(stats["r1"].item())
    assert len(r1) == 2
    rec, _ = means.means([])
    assert rec["r1"] == pytest.approx(sum(r1) / 2, rel=1e-6)
    restored = IntervalMeans()
    restored.load_state_dict(means.state_dict())
    assert restored.means([])[0] == rec


@pytest.mark.parametrize("players", [(1,), (), (5,), (0, 1)])
def test_a_term_that_names_the_wrong_players_is_refused(players):
    """A closure whose PenaltyTerm for r1 claims other players than D would drop the penalty (or move G) silently."""
    D, G, flat, x, z, _ = _setup()
    st = ODEStepper(flat, "euler", h=0.05, penalties={"r1": 10.0})

    def closure(stage):
        r = game_gradients(D, G, Batch(x, z), players=stage.players, penalties=stage.penalties)
        for t in r.terms.values():
            t.players = players
        return r

    before = flat.params.clone()
    with pytest.raises(ValueError, match="penalty 'r1'.s PenaltyTerm says it regularises players"):
        st.step(closure)
    assert torch.equal(flat.params, before)
