"""Populations of the image problems beyond the digits (CIFAR-10 in its on-disk format, an ImageFolder tree),
populations with G's weight average (ema) and class-conditional pairs (the imagenet128 preset's): each member is
the solo run of its config.json, its parameters, BN statistics and average included; an interrupted sweep with ema
resumes bit for bit; what is not built is refused in one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from odegan_kernels.cli import main
from odegan_kernels.flat import FlatParams
from odegan_kernels.problems import build_problem
from odegan_kernels.train.config import Config, make_config
from odegan_kernels.train.population import Population
from odegan_kernels.train.sweep import plan, run_sweep

from .test_population import step_with_member_poisoned
from .test_trainer import write_cifar10, write_imagefolder

TOL = 1e-12
TINY_IMAGES = ["--set", "dtype=float64", "--set", "width=4", "--set", "batch=4", "--set", "workers=0",
               "--set", "eval_samples=8", "--set", "eval_every=2", "--steps", "4"]  # fmt: skip


def sweep_then_train(tmp_path: Path, args: list[str], seed: int) -> tuple[Path, dict, dict]:
    """Run the sweep ``args`` (its only setting), then `odegan train` with member ``seed``'s config.json: (the
    member's folder, its params.pt, the solo run's checkpoint)."""
    out = tmp_path / "sweep"
    assert main([*args, "--out", str(out)]) == 0
    (member,) = [p.parent for p in out.glob(f"*/seed{seed}/config.json")]
    run = tmp_path / "solo"
    assert main(["train", "--config", str(member / "config.json"), "--out", str(run), "--no-progress"]) == 0
    return member, torch.load(member / "params.pt"), torch.load(run / "checkpoint.pt", weights_only=False)


def assert_players_equal(mine: dict, solo: dict) -> None:
    """Every tensor of D and G (parameters and BN statistics) within TOL of the player's largest value (a conv
    bias before BatchNorm has a zero gradient and holds rounding noise, as test_sweep's digits test says)."""
    for player in ("D", "G"):
        ref_all = solo[player]
        scale = max(t.abs().max().item() for t in ref_all.values() if t.is_floating_point())
        for name, ref in ref_all.items():
            got = mine[player][name]
            if not ref.is_floating_point():  # BN's num_batches_tracked
                assert torch.equal(got, ref), name
                continue
            assert torch.isfinite(ref).all() and torch.isfinite(got).all(), name
            rel = (got - ref).abs().max().item() / scale
            assert rel <= TOL, f"{player}.{name} differs by {rel:.3g} of the player's largest value"


def averaged_g(config: Path, solo: dict) -> dict:
    """The solo run's G (checkpoint ``solo``) with its flat average (ema.avg) in its parameters, in the solo run's
    own layout (FlatParams of its problem's pair); its BN statistics stay the trained ones."""
    cfg = Config(**json.loads(config.read_text()))
    cfg.validate()
    problem = build_problem(cfg.problem, cfg)
    problem.G.load_state_dict(solo["G"])
    avg = solo["ema"]["avg"]
    flat = FlatParams(D=problem.D, G=problem.G, dtype=cfg.torch_dtype)
    lo, hi = flat.segment("G")
    with torch.no_grad():
        flat.params[lo:hi].copy_(avg)
    return {k: v.clone() for k, v in problem.G.state_dict().items()}


def member_and_average_equal_solo(tmp_path: Path, args: list[str], seed: int, metric: str | None = None):
    """sweep_then_train, then the member's players and G's average checked against the solo run's: (the member's
    params.pt, its last record with ``metric``, the solo run's), the records None without ``metric``."""
    member, mine, solo = sweep_then_train(tmp_path, args, seed)
    assert_players_equal(mine, solo)
    ref = averaged_g(member / "config.json", solo)
    assert_players_equal({"D": mine["D"], "G": mine["G_ema"]}, {"D": solo["D"], "G": ref})
    if metric is None:
        return mine, None, None
    last = lambda path: [json.loads(r) for r in path.read_text().splitlines() if metric in r][-1]  # noqa: E731
    return mine, last(member / "metrics.jsonl"), last(tmp_path / "solo" / "metrics.jsonl")


@pytest.mark.parametrize("problem", ["cifar10", "imagefolder"])
def test_an_image_member_equals_odegan_train_with_its_config(tmp_path, problem):
    """A CIFAR-10 member (the pickled batches) and an ImageFolder member (PNG files resized to 16x16), each a DCGAN
    pair with BatchNorm and its own loader, with ema on: its parameters, BN statistics and weight average are
    those of `odegan train` with its config.json."""
    data = tmp_path / "data"
    if problem == "cifar10":
        write_cifar10(data, n=16)
        extra = []
    else:
        write_imagefolder(data, classes=2, per_class=6)
        extra = ["--set", "image_size=16"]
    args = ["sweep", problem, "--seeds", "0,1", "--set", f"data={data}", *TINY_IMAGES, *extra,
            "--set", "ema=0.9", "--set", "ema_start=1"]  # fmt: skip
    mine, _, _ = member_and_average_equal_solo(tmp_path, args, seed=1)
    assert any("running_var" in n for n in mine["G"])
    assert not torch.equal(mine["G_ema"]["net.0.weight"], mine["G"]["net.0.weight"])  # the average is not G


def test_a_mog_member_with_ema_samples_from_its_average(tmp_path):
    """The 16-Gaussian problem with ema: the member's average equals the solo run's, and so do its metrics, which
    a solo run takes from the average (and which differ from G's own: the check can fail)."""
    args = ["sweep", "mog", "--seeds", "0,2", "--h", "0.1", "--steps", "20", "--set", "dtype=float64",
            "--set", "eval_every=10", "--set", "batch=32", "--set", "hidden=8", "--set", "eval_samples=512",
            "--set", "ema=0.5", "--set", "ema_start=5"]  # fmt: skip
    _, ours, theirs = member_and_average_equal_solo(tmp_path, args, seed=2, metric="modes")
    assert ours["step"] == theirs["step"] == 20
    for key in ("modes", "high_quality"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-9), key


def test_an_interrupted_sweep_with_ema_resumes_exactly(tmp_path):
    """A population with ema stopped after its checkpoint at step 3 resumes to the uninterrupted run: G's averages
    too, bit for bit."""

    class Stop(Exception):
        pass

    def stop_at_the_checkpoint(line):
        if "step 3," in line:
            raise Stop(line)

    sets = dict(steps=6, eval_every=3, log_every=2, eval_samples=64, hidden=8, batch=16, ema=0.8, ema_start=2)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_sweep(plan("mog", whole, [0, 1], sets=sets), whole, ckpt_every=3, say=lambda line: None)
    with pytest.raises(Stop):
        run_sweep(plan("mog", cut, [0, 1], sets=sets), cut, ckpt_every=3, say=stop_at_the_checkpoint)
    state = torch.load(cut / "populations" / "p0" / "checkpoint.pt", weights_only=False)
    assert len(state["averages"]) == 2 and all(a["avg"] is not None for a in state["averages"])
    run_sweep(plan("mog", cut, [0, 1], sets=sets), cut, ckpt_every=3, say=lambda line: None)
    dirs = sorted(p.parent for p in whole.glob("*/seed*/config.json"))
    assert len(dirs) == 2
    for d in dirs:
        e = cut / d.relative_to(whole)
        assert (d / "metrics.jsonl").read_text() == (e / "metrics.jsonl").read_text()
        pa, pb = torch.load(d / "params.pt"), torch.load(e / "params.pt")
        for player in ("D", "G", "G_ema"):
            assert all(torch.equal(pa[player][k], pb[player][k]) for k in pa[player]), player


def test_a_retried_member_folds_in_only_its_good_steps():
    """A member whose step went non-finite folds nothing into its average for that step (as a solo run's rollback
    puts its average back), and a frozen member's average stays put, while the others' move."""
    base = dict(problem="mog", dtype="float64", batch=16, z_dim=4, hidden=6, backend="foreach", ema=0.5)
    pop = Population([Config(**base, seed=s) for s in (0, 1)])
    pop.step()
    before = [a.avg.clone() for a in pop.averages]
    step_with_member_poisoned(pop)
    assert pop.failures == [0, 1]
    assert torch.equal(pop.averages[1].avg, before[1]) and not torch.equal(pop.averages[0].avg, before[0])
    pop.freeze(0)
    frozen = pop.averages[0].avg.clone()
    pop.step()
    assert torch.equal(pop.averages[0].avg, frozen) and not torch.equal(pop.averages[1].avg, before[1])


def test_what_populations_do_not_run_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="not cuda_graph=true"):
        Population([Config(problem="mog", cuda_graph=True, seed=s) for s in (0, 1)])


CONDITIONAL = dict(workers=0, image_size=32, width=2, batch=4, eval_samples=8, dtype="float64", device="cpu",
                   progress=False)  # fmt: skip


@pytest.mark.parametrize(
    "extra", [{}, {"r1": 0.5, "coupling": "decoupled", "reg_at": "after_step"}, {"wgan_gp": 0.2, "method": "heun"}]
)
def test_class_conditional_members_are_their_solo_runs(tmp_path, extra):
    """The imagenet128 preset's class-conditional ResNet pair (conditional BN in G, a projection D) on a 3-class
    ImageFolder tree: each member draws its real labels with its batch and the labels to generate after its z, as a
    solo run does, so each equals its solo run (BN statistics included) with h mixed; R1 and WGAN-GP see the real
    labels, as solo."""
    write_imagefolder(tmp_path / "data", classes=3, per_class=4)
    opts = {**CONDITIONAL, "data": str(tmp_path / "data"), **extra}
    cfgs = [
        make_config("imagenet128", seed=s, h=h, out=str(tmp_path / f"m{s}"), **opts) for s, h in ((0, 0.04), (1, 0.02))
    ]
    pop = Population(cfgs)
    assert pop.problems[0].num_classes == 3 and type(pop.engine).__name__ == "PopulationAutograd"
    for _ in range(3):
        pop.step()
    for m, cfg in enumerate(cfgs):
        solo = solo_players(make_config("imagenet128", seed=cfg.seed, h=cfg.h, out=str(tmp_path / f"s{m}"), **opts), 3)
        assert_players_equal({"D": pop.problems[m].D.state_dict(), "G": pop.problems[m].G.state_dict()}, solo)


def test_bad_labels_are_refused_before_any_pass(tmp_path):
    """Labels outside the pair's classes, a conditional pair without labels and labels for an unconditional pair:
    each one line from the engine, before a pass has moved G's BN statistics."""
    from odegan_kernels.game import Batch, PopulationAutograd
    from odegan_kernels.models.mlp import mog_pair

    write_imagefolder(tmp_path / "data", classes=3, per_class=4)
    opts = {**CONDITIONAL, "data": str(tmp_path / "data")}
    pop = Population([make_config("imagenet128", seed=s, out=str(tmp_path / f"m{s}"), **opts) for s in (0, 1)])
    real = torch.randn(2, 4, 3, 32, 32, dtype=torch.float64)
    z = torch.randn(2, 4, pop.problems[0].z_dim, dtype=torch.float64)
    y = torch.zeros(2, 4, dtype=torch.long)
    before = [b.clone() for b in pop.flat.buffers()]
    for batch, want in [
        (Batch(real, z, y + 3, y), r"y_real holds classes outside \[0, 3\): 3\.\.3"),
        (Batch(real, z, y, y - 1), r"y_fake holds classes outside \[0, 3\)"),
        (Batch(real, z), "class-conditional .* needs y_real and y_fake"),
    ]:
        with pytest.raises(ValueError, match=want):
            pop.engine(batch, (0, 1), ("r1",))
    assert all(torch.equal(a, b) for a, b in zip(before, pop.flat.buffers()))
    pairs = [mog_pair(4, 6, seed=s) for s in range(2)]
    flat = FlatParams(D=[p[0] for p in pairs], G=[p[1] for p in pairs], members=2)
    with pytest.raises(ValueError, match="this pair is unconditional"):
        PopulationAutograd(flat, *pairs[0])(
            Batch(torch.randn(2, 8, 2), torch.randn(2, 8, 4), y[:, :1].repeat(1, 8), y[:, :1].repeat(1, 8))
        )


def test_a_conditional_sweep_resumed_on_other_data_is_refused_in_one_line(tmp_path, capsys):
    """A class added to the data after a checkpoint changes a conditional pair's parameter count: the resumed sweep
    says so, naming the checkpoint, rather than failing inside a copy."""
    data = tmp_path / "data"
    write_imagefolder(data, classes=3, per_class=4)
    out = tmp_path / "sweep"
    args = ["sweep", "imagenet128", "--seeds", "0,1", "--set", f"data={data}", *TINY_IMAGES, "--set", "image_size=32",
            "--set", "width=2", "--ckpt-every", "1", "--out", str(out)]  # fmt: skip
    cfgs = plan("imagenet128", out, [0, 1], sets={"data": str(data), "workers": 0, "image_size": 32, "width": 2,
                "batch": 4, "eval_samples": 8, "eval_every": 2, "dtype": "float64", "steps": 4})  # fmt: skip
    from odegan_kernels.train.sweep import PopulationRun, check_plan

    out.mkdir()
    check_plan(out, cfgs)
    run = PopulationRun(0, cfgs[0], out, ckpt_every=1)
    stop = RuntimeError("stopped after the first checkpoint")

    def stop_at_the_checkpoint(line):
        if "step 1" in line:
            raise stop

    with pytest.raises(RuntimeError, match="stopped after the first checkpoint"):
        run.run(say=stop_at_the_checkpoint)
    assert (run.dir / "checkpoint.pt").exists()
    write_imagefolder(tmp_path / "more", classes=4, per_class=4)
    (tmp_path / "more" / "n00000003").rename(data / "n00000003")  # a fourth class
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint.pt holds parameters of shape" in err and "classes" in err, err


def test_a_class_conditional_sweep_member_equals_odegan_train(tmp_path):
    """`odegan sweep imagenet128`: a member (ema on) equals `odegan train` with its config.json, G's average
    included, and its classifier metric, taken from samples of every class in turn, is the solo run's."""
    write_imagefolder(tmp_path / "data", classes=3, per_class=4)
    args = ["sweep", "imagenet128", "--seeds", "0,1", "--set", f"data={tmp_path / 'data'}", *TINY_IMAGES,
            "--set", "image_size=32", "--set", "width=2", "--set", "ema=0.9", "--set", "ema_start=1",
            "--set", "fid_features=classifier", "--set", "eval_samples=12"]  # fmt: skip
    _, ours, theirs = member_and_average_equal_solo(tmp_path, args, seed=1, metric="fid_classifier")
    assert ours["step"] == theirs["step"] == 4
    for key in ("fid_classifier", "coverage", "score"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-9), key


def solo_players(cfg, steps: int) -> dict:
    """D's and G's state dicts (BN statistics included) after ``steps`` steps of the Trainer with ``cfg``."""
    from odegan_kernels.train import Trainer

    tr = Trainer(cfg)
    for _ in range(steps):
        tr.train_step()
    return {"D": tr.D.state_dict(), "G": tr.G.state_dict()}


@pytest.mark.parametrize("weights", [("consensus", (0.0, 0.1)), ("wgan_gp", (0.0, 0.2)), ("wgan_gp", (0.2, 0.0))])
def test_members_that_weigh_a_penalty_zero_are_their_solo_runs(tmp_path, weights):
    """CIFAR-10 (a DCGAN pair, BatchNorm in G), decoupled with one batch a step: a member without consensus reuses
    its fakes in D's stages as its solo run does (its G's BN statistics are not moved by the others' consensus), and
    a member without WGAN-GP draws no interpolation weights from its stream, whichever member it is."""
    write_cifar10(tmp_path / "data", n=16)
    name, ws = weights
    opts = dict(data=str(tmp_path / "data"), workers=0, dtype="float64", width=4, batch=4, eval_samples=8,
                method="heun", coupling="decoupled", data_per_stage="shared", reg_at="after_step", device="cpu",
                progress=False)  # fmt: skip
    cfgs = [
        make_config("cifar10", seed=s, out=str(tmp_path / f"m{s}"), **{name: w}, **opts) for s, w in zip((0, 1), ws)
    ]
    pop = Population(cfgs)
    for _ in range(3):
        pop.step()
    for m, cfg in enumerate(cfgs):
        own = make_config("cifar10", seed=cfg.seed, out=str(tmp_path / f"s{m}"), **{name: ws[m]}, **opts)
        solo = solo_players(own, 3)
        mine = {"D": pop.problems[m].D.state_dict(), "G": pop.problems[m].G.state_dict()}
        assert_players_equal(mine, solo)


def test_a_summary_over_seeds_without_a_finite_metric_is_written(tmp_path):
    """A metric that is NaN or None for some seeds (a run that diverged in its samples) is summarised over the seeds
    that have one, and says how many do not; a metric no seed has is a dash, not a crash."""
    from odegan_kernels.train.sweep import summarise, write_summary

    results = [
        {"setting": "a", "seed": s, "method": "rk4", "h": 0.1, "reg": 0.0, "diverged": False,
         "final": {"step": 4, "fid": v, "score": float("nan")}}
        for s, v in enumerate([1.0, float("nan"), 3.0, None])
    ]  # fmt: skip
    (row,) = summarise(results)
    assert row["fid"] == {"mean": 2.0, "std": pytest.approx(2**0.5), "min": 1.0, "max": 3.0, "missing": 2}
    assert row["score"]["mean"] is None and row["score"]["missing"] == 4
    write_summary(tmp_path, [row], results, 1.0)
    text = (tmp_path / "summary.md").read_text()
    assert "2 ± 1.41 [1, 3] (2 seed(s) without a finite value)" in text and "| - |" in text


def test_more_bad_population_input_one_line(tmp_path):
    from odegan_kernels.game.population import PopulationAutograd
    from odegan_kernels.models.mlp import mog_pair
    from odegan_kernels.train.sweep import PopulationRun

    pairs = [mog_pair(4, 6, seed=s) for s in range(2)]
    flat = FlatParams(D=[p[0] for p in pairs], G=[p[1] for p in pairs], members=2)
    import numpy as np

    for ws in (torch.tensor([0.5, 1.0]), np.array([0.5, 1.0]), (np.float32(0.5), 1)):  # any sequence of reals
        assert PopulationAutograd(flat, *pairs[0], weights={"r1": ws}).weights["r1"].tolist() == [0.5, 1.0]
    with pytest.raises(ValueError, match="overflow the parameters' dtype"):
        PopulationAutograd(flat, *pairs[0], weights={"r1": [1e308, 1.0]})
    with pytest.raises(ValueError, match="a sequence of one weight per member"):
        PopulationAutograd(flat, *pairs[0], weights={"r1": "ab"})
    from odegan_kernels.game import Batch, PopulationMLP

    real, z, y = torch.randn(2, 8, 2), torch.randn(2, 8, 4), torch.zeros(2, 8, dtype=torch.long)
    for y_real, want in ((y[0], r"y_real is \[members, batch\] class indices"), (y.float(), "torch.long")):
        with pytest.raises(ValueError, match=want):
            PopulationAutograd(flat, *pairs[0])(Batch(real, z, y_real, y))
    with pytest.raises(ValueError, match="unconditional MLP pairs"):
        PopulationMLP(flat, *pairs[0])(Batch(real, z, y, y))
    with pytest.raises(ValueError, match="not cuda_graph=true") as err:
        Population([Config(problem="mog", cuda_graph=True, seed=s) for s in (0, 1)])
    assert "problem" not in str(err.value)
    with pytest.raises(ValueError, match="too few for the classifier metric"):
        make_config("digits", eval_samples=8)
    # a population checkpoint without the averages its members' ema asks for is refused, not silently restarted
    cfgs = [Config(problem="mog", ema=0.9, steps=4, out=str(tmp_path / f"m{s}"), seed=s) for s in (0, 1)]
    run = PopulationRun(0, [("a", c.seed, c) for c in cfgs], tmp_path, ckpt_every=2)
    run.dir.mkdir(parents=True)
    pop = Population(cfgs)
    torch.save({"params": pop.flat.params.clone(), "opt": pop.opt.state_dict(), "streams": [
        (s.data.get_state(), s.z.get_state()) for s in pop.streams], "member_steps": [0, 0], "failures": [0, 0],
        "frozen": [False, False], "diverged": [False, False], "records": [[], []], "run": {"pstep": 0}},
        run.dir / "checkpoint.pt")  # fmt: skip
    with pytest.raises(ValueError, match="holds no averages of G but the members have ema > 0"):
        run.run(say=lambda line: None)
