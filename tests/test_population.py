"""Populations: every member of a batched run equals the same settings run alone (float64, 20 steps), for every
method, coupling, placement, engine and CPU backend, with h and lambda mixed across members, and for the Adam/SGD
baselines; a member that diverges fails alone (the others bit-identical to the population without it)."""

from __future__ import annotations

import pytest
import torch

from odegan_kernels import ops
from odegan_kernels.flat import FlatParams
from odegan_kernels.models.mlp import mog_pair
from odegan_kernels.ode import ODEStepper
from odegan_kernels.problems import build_problem
from odegan_kernels.train.baselines import build_optimizer
from odegan_kernels.train.closure import GameClosure
from odegan_kernels.train.config import Config
from odegan_kernels.train.population import Population
from odegan_kernels.train.state import RandomStreams

STEPS = 20
TOL = 1e-12
BASE = dict(problem="mog", dtype="float64", batch=16, z_dim=4, hidden=6, backend="foreach", grads="auto")
MIXED = [dict(seed=0, h=0.1, reg=0.07), dict(seed=1, h=0.05, reg=0.0), dict(seed=2, h=0.2, reg=0.3)]


def solo(opts: dict, steps: int = STEPS) -> torch.Tensor:
    """The solo run of these options, built as the Trainer builds it (problem, FlatParams, optimiser, closure)."""
    cfg = Config(**opts)
    cfg.validate()
    problem = build_problem(cfg.problem, cfg)
    flat = FlatParams(D=problem.D, G=problem.G, dtype=cfg.torch_dtype)
    opt, _ = build_optimizer(cfg, flat)
    streams = RandomStreams(cfg.seed, 0, cfg.device)
    closure = GameClosure(cfg, problem, streams.data, streams.z)
    for _ in range(steps):
        opt.step(closure)
    return flat.params.clone()


def population(opts: dict, members: list[dict], steps: int = STEPS) -> Population:
    pop = Population([Config(**opts, **m) for m in members])
    for _ in range(steps):
        pop.step()
    return pop


def assert_members_equal_solo(opts: dict, members: list[dict] = MIXED) -> Population:
    pop = population(opts, members)
    for k, m in enumerate(members):
        ref = solo({**opts, **m})
        got = pop.member_params(k)
        assert torch.isfinite(ref).all()
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        assert rel <= TOL, f"member {k} ({m}) differs from its solo run by {rel:.3g} relative"
        assert not torch.equal(pop.member_params(k), pop.member_params((k + 1) % len(members)))
    return pop


def step_with_member_poisoned(pop: Population, member: int = 1) -> None:
    """One population step in which ``member``'s gradients go non-finite at the first stage (its whole step NaN)."""
    inner, block = pop.closure, pop.flat.block

    def poisoned(stage):
        out = inner(stage)
        if stage.index == 0:
            pop.flat.grads[member * block : (member + 1) * block].fill_(float("nan"))
        return out

    pop.closure = poisoned
    try:
        pop.step()
    finally:
        pop.closure = inner


@pytest.mark.parametrize("method", ["euler", "heun", "midpoint", "ralston", "rk3", "rk4"])
def test_every_method(method):
    assert_members_equal_solo({**BASE, "method": method, "reg_at": "after_step", "coupling": "joint"})


@pytest.mark.parametrize("coupling", ["joint", "decoupled"])
@pytest.mark.parametrize("reg_at", ["first_stage", "after_step"])
@pytest.mark.parametrize("grads", ["mlp", "autograd"])
@pytest.mark.parametrize("data", ["fresh", "shared"])
def test_couplings_placements_engines(coupling, reg_at, grads, data):
    opts = {**BASE, "method": "rk4", "coupling": coupling, "reg_at": reg_at, "grads": grads, "data_per_stage": data}
    pop = assert_members_equal_solo(opts)
    assert type(pop.engine).__name__ == ("PopulationMLP" if grads == "mlp" else "PopulationAutograd")


@pytest.mark.parametrize("hidden", [1, 2])
def test_narrow_layers_on_the_hand_derived_engine(hidden):
    """One- and two-unit hidden layers: the batched engine's outer products as broadcast multiplies (one unit) and
    as products (two) in every layer, not only D's output layer."""
    opts = {**BASE, "hidden": hidden, "method": "rk4", "grads": "mlp", "reg_at": "first_stage", "coupling": "joint"}
    assert type(assert_members_equal_solo(opts).engine).__name__ == "PopulationMLP"


@pytest.mark.parametrize("backend", ["reference", "foreach", "csrc"])
def test_cpu_backends(backend):
    assert ops.supports(backend, "cpu"), f"backend {backend} cannot run here: {ops.why_unavailable(backend)}"
    assert_members_equal_solo({**BASE, "method": "heun", "backend": backend})


def test_penalties_per_member():
    """r1, r2, WGAN-GP and consensus (through the vmapped autograd engine), each member with its own lambda."""
    opts = {**BASE, "method": "euler", "r1": 0.5, "r2": 0.2, "wgan_gp": 0.2, "consensus": 0.1, "reg_at": "first_stage"}
    pop = assert_members_equal_solo(opts)
    assert type(pop.engine).__name__ == "PopulationAutograd"


@pytest.mark.parametrize("optimizer,coupling", [("ode", "joint"), ("ode", "decoupled"), ("adam", "joint")])
def test_penalty_weights_per_member(optimizer, coupling):
    """Each member its own r1, r2, WGAN-GP and consensus weights (one of them 0 for one member; r1 lazy, every 2
    steps): the engine weighs each member's value by its own weight, the optimiser gives the term weight 1.
    Decoupled: D's penalties in D's stages, G's stages without them."""
    members = [
        dict(seed=0, h=0.1, reg=0.07, r1=0.5, r2=0.0, wgan_gp=0.2, consensus=0.1),
        dict(seed=1, h=0.05, reg=0.07, r1=0.1, r2=0.3, wgan_gp=0.2, consensus=0.4),
        dict(seed=2, h=0.2, reg=0.07, r1=2.0, r2=0.1, wgan_gp=0.2, consensus=0.0),
    ]
    opts = {**BASE, "method": "heun", "reg_at": "first_stage", "penalty_every": 2, "coupling": coupling}
    if optimizer == "adam":
        opts.update(optimizer="adam", lr=1e-2)
    pop = assert_members_equal_solo(opts, members)
    assert sorted(pop.engine.weights) == ["consensus", "r1", "r2"]  # wgan_gp is alike: the optimiser's weight
    assert pop.engine.weights["r1"].tolist() == [0.5, 0.1, 2.0]


def test_member_weights_bad_input_one_line():
    from odegan_kernels.game.population import PopulationAutograd

    pairs = [mog_pair(4, 6, seed=s) for s in range(2)]
    flat = FlatParams(D=[p[0] for p in pairs], G=[p[1] for p in pairs], members=2)
    for weights, match in (
        ({"g_reg": [1, 2]}, "not a penalty a population weighs per member"),
        ({"r1": [1.0]}, r"one weight per member \(2\)"),
        ({"r1": [1.0, float("nan")]}, "finite numbers >= 0"),
        ({"r1": [1.0, -1.0]}, "finite numbers >= 0"),
        ([1.0, 2.0], "must be a dict"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            PopulationAutograd(flat, *pairs[0], weights=weights)


@pytest.mark.parametrize("grads", ["mlp", "autograd"])
@pytest.mark.parametrize("anneal", [0, 12])
def test_instance_noise_per_member(grads, anneal):
    """Instance noise on D's inputs (constant, and annealed to 0 over 12 of the 20 steps), each member's unit noise
    from its own z stream and its std at its own step count; with r1 and WGAN-GP on the noisy inputs (autograd)."""
    pens = dict(r1=0.3, wgan_gp=0.2) if grads == "autograd" else {}
    opts = {**BASE, "method": "heun", "grads": grads, "instance_noise": 0.3, "instance_noise_anneal": anneal, **pens}
    pop = assert_members_equal_solo(opts)
    assert type(pop.engine).__name__ == ("PopulationMLP" if grads == "mlp" else "PopulationAutograd")
    assert pop.game_closure.sigma.tolist() == [0.3 * max(0.0, 1 - (STEPS - 1) / anneal) if anneal else 0.3] * len(MIXED)


def test_a_retried_member_anneals_its_noise_at_its_own_step_count():
    pop = Population([Config(**BASE, **m, instance_noise=0.4, instance_noise_anneal=10) for m in MIXED[:2]])
    pop.step()
    step_with_member_poisoned(pop)
    pop.step()  # member 0 at its step 3 (2 taken), member 1 at its step 2 (1 taken)
    assert pop.member_steps == [3, 2]
    assert pop.game_closure.sigma.tolist() == pytest.approx([0.4 * 0.8, 0.4 * 0.9], rel=1e-15)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_baselines(kind):
    members = [dict(seed=0, reg=0.07), dict(seed=3, reg=0.07), dict(seed=5, reg=0.07)]
    assert_members_equal_solo({**BASE, "optimizer": kind, "lr": 1e-2}, members)


def test_one_diverging_member_fails_alone():
    """A member with a step size that blows up is rolled back, retried with smaller h, then frozen; the others
    end bit-identical to the population without it, and its parameters are its last finite ones."""
    opts = {**BASE, "method": "rk4", "recover_retries": 2, "recover_factor": 0.5}
    good = [MIXED[0], MIXED[2]]
    bad = dict(seed=7, h=1e300, reg=0.07)
    pop = population(opts, [good[0], bad, good[1]])
    ref = population(opts, good)
    assert pop.diverged == [False, True, False] and pop.frozen[1]
    assert pop.failures[1] == 3 and pop.h[1] == pytest.approx(1e300 * 0.25)
    assert pop.member_steps == [STEPS, 0, STEPS]
    assert torch.equal(pop.member_params(0), ref.member_params(0))
    assert torch.equal(pop.member_params(2), ref.member_params(1))
    assert torch.isfinite(pop.member_params(1)).all()
    start = Population([Config(**opts, **bad)]).member_params(0)
    assert torch.equal(pop.member_params(1), start)  # never took a finite step: still at its start


def test_members_are_views_and_segments():
    pairs = [mog_pair(4, 6, seed=s, dtype=torch.float64) for s in range(3)]
    flat = FlatParams(D=[p[0] for p in pairs], G=[p[1] for p in pairs], members=3, dtype=torch.float64)
    assert flat.members == 3 and flat.nplayers == 2 and len(flat.segments) == 6
    assert flat.names[:2] == ["m0.D", "m0.G"]
    w = flat.stacked("G")["0.weight"]
    assert w.shape == (3, 6, 4) and w.is_leaf and w.requires_grad
    assert torch.equal(w[2], pairs[2][1][0].weight)
    with torch.no_grad():
        w[1].fill_(3.0)
    assert (pairs[1][1][0].weight == 3.0).all()  # member modules see the population's values
    (w**2).sum().backward()
    assert torch.equal(pairs[1][1][0].weight.grad, 2 * pairs[1][1][0].weight)
    flat.check_grads()
    stepper = ODEStepper(flat, "rk4", h=[0.1, 0.2, 0.3], reg=[0.0, 0.07, 0.3], reg_at="after_step")
    assert stepper.h == [0.1, 0.1, 0.2, 0.2, 0.3, 0.3]
    rows = stepper.coefficients()
    assert rows[-1, :, 4].tolist() == [0.0, 0.0, 0.07 / (1 / 6), 0.0, 0.3 / (1 / 6), 0.0]


def test_bad_input_one_line():
    pairs = [mog_pair(4, 6, seed=s) for s in range(2)]
    Ds, Gs = [p[0] for p in pairs], [p[1] for p in pairs]
    with pytest.raises(ValueError, match="members .* must be an int >= 1"):
        FlatParams(D=Ds, G=Gs, members=0)
    with pytest.raises(ValueError, match="has 2 members' modules but members=3"):
        FlatParams(D=Ds, G=Gs, members=3)
    with pytest.raises(TypeError, match="list of its members' modules"):
        FlatParams(D=Ds[0], G=Gs, members=2)
    odd = mog_pair(4, 7, seed=0)[1]
    with pytest.raises(ValueError, match="member 1's G does not match member 0's"):
        FlatParams(D=Ds, G=[Gs[0], odd], members=2)
    flat = FlatParams(D=Ds, G=Gs, members=2)
    with pytest.raises(ValueError, match="h has 3 step sizes for a population of 2 members"):
        ODEStepper(flat, h=[0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="reg has 3 values for a population of 2 members"):
        ODEStepper(flat, reg=[0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="member 1 has method='euler' but member 0 has 'rk4'"):
        Population([Config(**BASE, method="rk4"), Config(**BASE, method="euler", seed=1)])
    with pytest.raises(ValueError, match="at least one member"):
        Population([])
    with pytest.raises(ValueError, match=r"populations run mog, .* or imagefolder, not problem='dirac'"):
        Population([Config(**{**BASE, "problem": "dirac"})])


def test_the_schedule_reads_each_members_own_step_count():
    """The cifar schedule (h/4 for 500 steps) as a solo run's LambdaLR applies it: h times the multiplier at the
    member's own step count (a retried member is a step behind), a retry's factor on top."""
    pop = Population([Config(**BASE, **m, schedule="cifar") for m in MIXED[:2]])
    assert pop.h == [0.1 * 0.25, 0.05 * 0.25]
    pop.member_steps, pop.failures = [500, 499], [0, 1]
    pop.set_step_sizes()
    assert pop.h == [0.1, 0.05 * 0.5 * 0.25] and [g["lr"] for g in pop.opt.param_groups[2:4]] == [0.05 * 0.5 * 0.25] * 2


def test_retried_member_continues_as_its_solo_run_with_the_smaller_h():
    """A member whose first step diverges is put back (parameters and random streams) and retried with h times
    recover_factor: it then follows exactly the solo run with the reduced h, from the same draws."""
    opts = {**BASE, "method": "heun", "recover_retries": 2, "recover_factor": 1e-301}
    bad = dict(seed=4, h=1e300, reg=0.07)
    pop = population(opts, [MIXED[0], bad])
    h = 1e300 * 1e-301
    assert pop.failures == [0, 1] and pop.diverged == [False, False] and pop.h[1] == h
    assert pop.member_steps == [STEPS, STEPS - 1]
    ref = solo({**opts, **bad, "h": h}, steps=STEPS - 1)
    rel = ((pop.member_params(1) - ref).abs().max() / ref.abs().max()).item()
    assert rel <= TOL
    assert torch.equal(pop.member_params(0), population(opts, [MIXED[0]]).member_params(0))


def test_a_retried_member_keeps_its_own_lazy_penalty_steps():
    """With a lazy r1 (every 2 steps), a member retried once is a step behind the population: its r1 comes at its
    own even steps, as in its solo run, and the other member's at theirs (the population's)."""
    opts = {**BASE, "method": "heun", "recover_retries": 2, "recover_factor": 1e-301, "r1": 0.3, "penalty_every": 2}
    bad = dict(seed=4, h=1e300, reg=0.07)
    pop = population(opts, [MIXED[0], bad])
    assert pop.failures == [0, 1] and pop.member_steps == [STEPS, STEPS - 1]
    for k, ref in enumerate((solo({**opts, **MIXED[0]}), solo({**opts, **bad, "h": 1e300 * 1e-301}, STEPS - 1))):
        rel = ((pop.member_params(k) - ref).abs().max() / ref.abs().max()).item()
        assert rel <= TOL, f"member {k} differs from its solo run by {rel:.3g}"
    assert [p.every for p in pop.opt.penalties] == [2] and not pop.engine.weights  # put back after every step


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_a_retried_baseline_member_gets_its_optimiser_state_back(kind):
    """A member of an Adam (or SGD) population whose third step went non-finite is put back with its optimiser state
    (Adam's moments and step count) and retried at lr x recover_factor: it equals the run that took two steps at lr
    and the rest at lr / 2; the other member its own uninterrupted run."""
    opts = {**BASE, "optimizer": kind, "lr": 1e-2, "recover_factor": 0.5}
    members = [dict(seed=0, reg=0.07), dict(seed=3, reg=0.07)]
    pop = Population([Config(**opts, **m) for m in members])
    for _ in range(2):
        pop.step()
    step_with_member_poisoned(pop)
    for _ in range(STEPS - 3):
        pop.step()
    assert pop.failures == [0, 1] and pop.member_steps == [STEPS, STEPS - 1] and not pop.frozen[1]
    ref = Population([Config(**opts, **members[1])])
    for step in range(STEPS - 1):
        if step == 2:
            for g in ref.opt.param_groups:
                g["lr"] *= 0.5
        ref.step()
    for got, want in ((pop.member_params(1), ref.member_params(0)),
                      (pop.member_params(0), population(opts, members[:1]).member_params(0))):  # fmt: skip
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert torch.isfinite(got).all() and rel <= TOL, rel


@pytest.mark.parametrize("problem", ["mog", "digits"])
def test_a_step_that_raises_leaves_the_population_at_its_start(problem, tmp_path):
    """An exception (or Ctrl-C) inside a step puts every member back to the step's start (parameters, random streams,
    data positions, BN statistics, Adam's moments), so taking the step again gives the uninterrupted population."""
    if problem == "digits":
        pytest.importorskip("sklearn", reason="the digits need scikit-learn (the [dev] and [digits] extras)")
        from odegan_kernels.train.config import make_config

        cfgs = lambda: [make_config("digits", seed=s, width=4, batch=8, out=str(tmp_path / f"m{s}")) for s in (0, 1)]  # noqa: E731
    else:
        cfgs = lambda: [Config(**BASE, **m, optimizer="adam", lr=1e-2, reg=0.07) for m in (dict(seed=0), dict(seed=1))]  # noqa: E731
    pop, ref = Population(cfgs()), Population(cfgs())
    pop.step(), ref.step()
    inner = pop.closure

    def boom(stage):
        out = inner(stage)
        if stage.index == 0:
            raise KeyboardInterrupt
        return out

    pop.closure = boom
    with pytest.raises(KeyboardInterrupt):
        pop.step()
    pop.closure = inner
    for _ in range(2):
        pop.step(), ref.step()
    assert torch.equal(pop.flat.params, ref.flat.params)
    assert all(torch.equal(a, b) for a, b in zip(pop.flat.buffers(), ref.flat.buffers()))


def test_readme_population_example_runs(capsys):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Populations: many runs as one\n.*?```python\n(.*?)```", text, re.S).group(1)
    assert "range(100)" in code
    scope: dict = {}
    exec(compile(code.replace("range(100)", "range(3)"), "README.md", "exec"), scope)
    assert scope["stepper"].steps == 3 and scope["stepper"].h[::2] == [0.05] * 4 + [0.1] * 4
    assert scope["result"].loss_d.shape == (8,) and torch.isfinite(scope["flat"].params).all()
    assert len(capsys.readouterr().out.splitlines()) == 1


class _ConvD(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, 2, 1, dtype=torch.float64),
            torch.nn.LeakyReLU(0.1),
            torch.nn.Flatten(),
            torch.nn.Linear(4 * 4 * 4, 1, dtype=torch.float64),
        )

    def forward(self, x):
        return self.net(x).squeeze(-1)


def _conv_pair(seed: int):
    """A tiny DCGAN-like pair: G with BatchNorm (running statistics in training mode), D convolutional."""
    torch.manual_seed(seed)
    G = torch.nn.Sequential(
        torch.nn.Linear(3, 4 * 4 * 4, dtype=torch.float64),
        torch.nn.Unflatten(1, (4, 4, 4)),
        torch.nn.BatchNorm2d(4, eps=1e-3, momentum=0.1, dtype=torch.float64),
        torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(4, 1, 4, 2, 1, dtype=torch.float64),
        torch.nn.Tanh(),
    )
    return _ConvD(), G


@pytest.mark.parametrize("coupling,reg_at", [("joint", "first_stage"), ("decoupled", "after_step")])
def test_conv_pair_with_batchnorm(coupling, reg_at):
    """Any nn.Module pair through vmap(functional_call): a conv pair whose G has BatchNorm; each member's
    parameters and running statistics equal its solo run's."""
    from odegan_kernels.game import AutogradEngine, PopulationAutograd
    from odegan_kernels.game import Batch as GBatch

    seeds, hs, regs = [0, 1, 2], [0.1, 0.05, 0.2], [0.07, 0.0, 0.3]

    def draw(gen, n=6):
        return torch.rand(n, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1, torch.randn(
            n, 3, generator=gen, dtype=torch.float64
        )

    pairs = [_conv_pair(s) for s in seeds]
    solos = []
    for (D, G), s, h, r in zip([_conv_pair(s) for s in seeds], seeds, hs, regs):
        flat = FlatParams(D=D, G=G, dtype=torch.float64)
        st = ODEStepper(flat, "heun", h=h, reg=r, reg_at=reg_at, coupling=coupling, backend="foreach")
        eng, gen = AutogradEngine(D, G), torch.Generator().manual_seed(100 + s)

        def closure(stage, eng=eng, gen=gen):
            x, z = draw(gen)
            return eng(GBatch(x, z), stage.players, stage.penalties)

        for _ in range(STEPS):
            st.step(closure)
        solos.append((flat.params.clone(), G[2].running_mean.clone(), G[2].running_var.clone()))
    flat = FlatParams(D=[p[0] for p in pairs], G=[p[1] for p in pairs], members=3, dtype=torch.float64)
    st = ODEStepper(flat, "heun", h=hs, reg=regs, reg_at=reg_at, coupling=coupling, backend="foreach")
    eng = PopulationAutograd(flat, *pairs[0])
    gens = [torch.Generator().manual_seed(100 + s) for s in seeds]

    def closure(stage):
        xs, zs = zip(*(draw(g) for g in gens))
        return eng(GBatch(torch.stack(xs), torch.stack(zs)), stage.players, stage.penalties)

    for _ in range(STEPS):
        st.step(closure)
    for k, (params, mean, var) in enumerate(solos):
        got = flat.params[k * flat.block : (k + 1) * flat.block]
        assert ((got - params).abs().max() / params.abs().max()).item() <= TOL
        bn = pairs[k][1][2]
        assert ((bn.running_mean - mean).abs().max() / mean.abs().max()).item() <= TOL
        assert ((bn.running_var - var).abs().max() / var.abs().max()).item() <= TOL
        assert not torch.equal(bn.running_mean, torch.zeros_like(mean))


def test_digits_members_are_put_back_whole(tmp_path):
    """The digits (a conv pair with BatchNorm, a data loader per member): a member whose step goes non-finite is put
    back whole (parameters, BN statistics, data position, z stream) while the others move; a frozen member's
    parameters and statistics stay as they were."""
    pytest.importorskip("sklearn", reason="the digits need scikit-learn (the [dev] and [digits] extras)")
    from odegan_kernels.train.config import make_config

    cfgs = [make_config("digits", seed=s, width=8, batch=8, out=str(tmp_path / f"m{s}")) for s in (0, 1)]
    pop = Population(cfgs)
    assert type(pop.engine).__name__ == "PopulationAutograd"
    bufs = [b for q in range(pop.flat.nplayers) for b in pop.flat.stacked_buffers(q).values()]
    assert bufs, "the digits' G has BatchNorm statistics"

    def snapshot(m):
        return (
            pop.member_params(m).clone(),
            [b[m].clone() for b in bufs],
            dict(pop.problems[m].state_dict()),
            pop.streams[m].z.get_state(),
        )

    def same(a, b):
        params, stats = torch.equal(a[0], b[0]), all(map(torch.equal, a[1], b[1]))
        return params and stats and a[2] == b[2] and torch.equal(a[3], b[3])

    pop.step()
    before = [snapshot(0), snapshot(1)]
    step_with_member_poisoned(pop)
    assert pop.failures == [0, 1] and pop.member_steps == [2, 1]
    assert same(snapshot(1), before[1])
    moved = snapshot(0)
    assert not torch.equal(moved[0], before[0][0]) and moved[2]["batches"] == before[0][2]["batches"] + 4
    assert not all(map(torch.equal, moved[1], before[0][1]))  # member 0's BN statistics moved
    pop.freeze(0)
    pop.step()
    frozen, retried = snapshot(0), snapshot(1)
    assert torch.equal(frozen[0], moved[0]) and all(map(torch.equal, frozen[1], moved[1]))
    assert pop.member_steps == [2, 2] and not torch.equal(retried[0], before[1][0])
    assert all(torch.isfinite(t).all() for t in (retried[0], *retried[1]) if t.is_floating_point())


def test_a_population_rank_that_torch_distributed_does_not_have_is_refused():
    """rank and world must be torch.distributed's: rank 0 on every process would give every rank the same data."""
    cfg = Config(**BASE)
    with pytest.raises(ValueError, match="world=2 needs torch.distributed initialised first"):
        Population([cfg], rank=1, world=2)
    with pytest.raises(TypeError, match="rank and world must be ints"):
        Population([cfg], rank=True, world=1)
