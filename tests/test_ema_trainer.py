"""The trainer's weight average of G (options ema, ema_start): its update against a hand computation and the
reference op, evaluation from the averaged weights without disturbing training, exact resume, rollback."""

import copy
import json

import pytest
import torch
from torch import nn

from odegan_kernels import FlatParams, cli
from odegan_kernels.ops import reference
from odegan_kernels.train import Trainer, TrainingInterrupted, make_config, read_checkpoint
from odegan_kernels.train.ema import GeneratorAverage

from .conftest import TOL, assert_close, corrupt_once

FAST = dict(eval_every=10, log_every=5, plot_every=10, ckpt_every=10, eval_samples=256, progress=False)
EMA = dict(ema=0.9, ema_start=3)


def _trainer(out, **opts) -> Trainer:
    return Trainer(make_config("mog", out=str(out), **{**FAST, **EMA, **opts}))


def _g_params(tr: Trainer) -> torch.Tensor:
    lo, hi = tr.flat.segment("G")
    return tr.flat.params[lo:hi].clone()


def with_weights(tr: Trainer, segment: torch.Tensor) -> nn.Module:
    """A copy of G, in eval mode, whose parameters are read from ``segment`` (a vector laid out as G's segment)."""
    g = copy.deepcopy(tr.G).eval()
    lo = tr.flat.segment("G")[0]
    params = dict(g.named_parameters())
    with torch.no_grad():
        for entry in tr.flat.layout("G"):
            p = params[entry.name.split(".", 1)[1]]
            p.copy_(segment[entry.offset - lo : entry.offset - lo + p.numel()].view_as(p))
    return g


def test_the_average_follows_the_hand_computation(tmp_path):
    """A copy of G's weights for the first ema_start steps, then avg <- 0.9 avg + 0.1 params after each step;
    D's weights never enter it."""
    tr = _trainer(tmp_path, steps=12)
    hand = _g_params(tr).double()
    for step in range(1, 13):
        tr.train_step()
        p = _g_params(tr).double()
        hand = p if step <= 3 else 0.9 * hand + 0.1 * p
        assert_close(tr.ema.avg.double(), hand, what=f"step {step}", rtol=1e-6, atol=1e-7)
    assert not torch.equal(tr.ema.avg, _g_params(tr)), "the average should lag the trained weights"
    assert tr.ema.avg.numel() == tr.flat.segment("G")[1] - tr.flat.segment("G")[0]


@pytest.mark.parametrize("backend", ["reference", "foreach", "csrc"])
def test_the_update_is_the_op_on_g_segment(tmp_path, backend):
    """After the warm-up each update is ops.ema_update(avg, G's segment, cfg.ema) on cfg.backend: the reference
    applied to the same inputs gives the same average."""
    tr = _trainer(tmp_path, steps=10, backend=backend, ema_start=0)
    for _ in range(4):
        before = tr.ema.avg.clone()
        tr.train_step()
        want = before.clone()
        reference.ema_update(want, _g_params(tr), 0.9)
        assert_close(tr.ema.avg, want, what=backend, **TOL[torch.float32])


def test_evaluation_uses_the_averaged_weights_and_leaves_training_alone(tmp_path):
    """Samples, plots and metrics come from G with the average in its parameters (checked against a copy of G
    holding the hand-computed average); afterwards the trained weights (bit for bit) and G's mode are back."""
    tr = _trainer(tmp_path, steps=8)
    hand = _g_params(tr).double()
    for step in range(1, 9):
        tr.train_step()
        hand = _g_params(tr).double() if step <= 3 else 0.9 * hand + 0.1 * _g_params(tr).double()
    trained, x0 = tr.flat.params.clone(), tr.opt.x0.clone() if hasattr(tr.opt, "x0") else None
    with torch.no_grad():
        want = with_weights(tr, hand.float())(tr.fixed_z)
        plain = tr.G.eval()(tr.fixed_z)
    tr.G.train()
    got = tr.samples()
    assert_close(got, want, what="samples", rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, plain), "the samples should differ from the trained weights' samples"
    assert tr.G.training, "G's mode was not restored"
    assert torch.equal(tr.flat.params, trained), "evaluation changed the trained weights"
    assert x0 is None or torch.equal(tr.opt.x0, x0)
    result = tr.evaluate()
    assert result == {"step": 8, **tr.problem.evaluate(want)}
    assert torch.equal(tr.flat.params, trained)
    # training goes on from the trained weights: equal to a run that never evaluated
    other = _trainer(tmp_path / "other", steps=8)
    for _ in range(9):
        other.train_step()
    tr.train_step()
    assert torch.equal(tr.flat.params, other.flat.params) and torch.equal(tr.ema.avg, other.ema.avg)


def test_ema_off_changes_nothing(tmp_path):
    tr = _trainer(tmp_path, steps=5, ema=0.0)
    assert not tr.ema.enabled and tr.ema.avg is None
    tr.train_step()
    with torch.no_grad():
        want = tr.G.eval()(tr.fixed_z)
    assert torch.equal(tr.samples(), want)
    tr.G.train()
    assert tr.local_state_dict()["ema"] == {"avg": None}


@pytest.mark.parametrize("where", ["eval", "mid_step"])
def test_exact_resume_with_ema(tmp_path, where):
    """Interrupted (in an evaluation after step 20, or inside step 18) and resumed, a run with ema on ends where
    an uninterrupted one does: parameters, the average and every metrics row (evaluated on the average)."""
    straight = _trainer(tmp_path / "straight", steps=30)
    straight.run()
    out = tmp_path / "b"
    tr = _trainer(out, steps=30)
    if where == "eval":
        inner = tr.problem.evaluate

        def interrupt(*args, **kw):
            if tr.step == 20 and not getattr(interrupt, "done", False):
                interrupt.done = True
                raise KeyboardInterrupt
            return inner(*args, **kw)

        tr.problem.evaluate = interrupt
    else:
        inner = tr.closure

        def interrupt(stage):
            if tr.step == 17 and stage.index == 0:
                raise KeyboardInterrupt
            return inner(stage)

        tr.closure = interrupt
    with pytest.raises(TrainingInterrupted):
        tr.run()
    saved = read_checkpoint(out / "checkpoint.pt")
    assert saved["ema"]["avg"] is not None and saved["ema"]["avg"].shape == tr.ema.avg.shape
    g_saved = torch.cat([v.reshape(-1) for k, v in saved["G"].items() if "running" not in k])
    assert not torch.equal(g_saved, saved["ema"]["avg"][: g_saved.numel()]), "saved the average as G's weights"
    resumed = _trainer(out, steps=30)
    resumed.run()
    assert torch.equal(resumed.flat.params, straight.flat.params)
    assert torch.equal(resumed.ema.avg, straight.ema.avg)
    rows = lambda d: [{k: v for k, v in r.items() if k != "steps_per_s"} for r in map(json.loads, open(d))]
    assert rows(out / "metrics.jsonl") == rows(tmp_path / "straight" / "metrics.jsonl")


def test_a_rollback_restores_the_average(tmp_path):
    """Divergence recovery rolls the average back with the weights: it ends finite, not poisoned by the NaN step."""
    tr = _trainer(tmp_path, steps=30)
    hit = corrupt_once(tr)
    tr.run()
    assert hit and any(r.get("event") == "diverged" for r in map(json.loads, open(tmp_path / "metrics.jsonl")))
    assert torch.isfinite(tr.ema.avg).all() and torch.isfinite(tr.recovery.good[1]["ema"]["avg"]).all()


def test_ema_options_are_checked(capsys):
    for value in ("1.0", "-0.1", "nan", "1.5"):
        assert cli.main(["train", "mog", "--dry-run", "--set", f"ema={value}"]) == 2, value
        assert "ema must be in [0, 1)" in capsys.readouterr().err
    assert cli.main(["train", "mog", "--dry-run", "--set", "ema_start=-1"]) == 2
    assert "ema_start must be >= 0" in capsys.readouterr().err
    assert make_config("mog", ema=0.999, ema_start=100).ema == 0.999
    with pytest.raises(TypeError, match="option ema expects a number"):
        make_config("mog", ema="high")


def test_resume_with_another_decay_is_refused(tmp_path):
    _trainer(tmp_path, steps=10).run()
    with pytest.raises(ValueError, match="checkpoint was trained with ema=0.9 but this run asks for ema=0.99"):
        _trainer(tmp_path, steps=20, ema=0.99).run()


def test_batchnorm_statistics_stay_the_trained_ones():
    """Only parameters are averaged and swapped: a BN generator is evaluated with its trained running statistics,
    in eval mode, and gets its weights and mode back after."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    D = nn.Linear(2, 1)
    flat = FlatParams(D=D, G=G)
    G(torch.randn(64, 3))  # running statistics away from their initial values
    ema = GeneratorAverage(flat, decay=0.5)
    with torch.no_grad():
        flat.params.add_(1.0)  # a "step": D and G move
    ema.update(1)
    stats = {k: v.clone() for k, v in G.state_dict().items() if "running" in k}
    trained = flat.params.clone()
    x = torch.randn(5, 3)
    with ema.evaluating(G):
        assert not G.training
        got = G(x)
        assert torch.equal(G[1].running_mean, stats["1.running_mean"])
    assert G.training and torch.equal(flat.params, trained)
    averaged = copy.deepcopy(G).eval()
    with torch.no_grad():
        for p in averaged.parameters():
            p.sub_(0.5)  # 0.5 * w + 0.5 * (w + 1): halfway between before and after the step
        want = averaged(x)
    assert_close(got, want, what="BN generator", rtol=1e-6, atol=1e-6)
    assert all(torch.equal(G.state_dict()[k], v) for k, v in stats.items())
