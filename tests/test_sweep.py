"""``odegan sweep``: the grid grouped into populations, a folder per member, the summary's spread over seeds, and
an interrupted sweep (killed with SIGKILL mid-population) that resumes to exactly the uninterrupted one."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from odegan_kernels.cli import main
from odegan_kernels.train.sweep import parse_seeds, plan

ARGS = [
    "sweep", "mog", "--seeds", "0-2", "--h", "0.1,0.2", "--method", "euler", "--members", "4", "--steps", "40",
    "--ckpt-every", "2", "--set", "eval_every=20", "--set", "log_every=10", "--set", "eval_samples=256",
    "--set", "hidden=8", "--set", "batch=64",
]  # fmt: skip


def member_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/seed*/config.json"))


def test_grid_folders_and_summary(tmp_path):
    out = tmp_path / "sweep"
    assert main([*ARGS, "--out", str(out)]) == 0
    pops = sorted((out / "populations").iterdir())
    assert [p.name for p in pops] == ["p0", "p1"]  # 6 members, at most 4 per population
    dirs = member_dirs(out)
    assert len(dirs) == 6
    for d in dirs:
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["steps"] == 40 and cfg["out"] == str(d) and cfg["method"] == "euler"
        lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines if "loss_d" in r] == [10, 20, 30, 40]
        assert [r["step"] for r in lines if "modes" in r] == [20, 40]
        assert (d / "samples_40.png").exists() and (d / "params.pt").exists()
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["setting"]: r for r in summary["settings"]}
    assert set(rows) == {"euler_h0.1_reg0.07", "euler_h0.2_reg0.07"}
    for name, row in rows.items():
        finals = [m["final"]["kl"] for m in summary["members"] if m["setting"] == name]
        assert row["seeds"] == 3 and row["diverged"] == 0
        assert row["kl"]["min"] == min(finals) and row["kl"]["max"] == max(finals)
        assert row["kl"]["mean"] == pytest.approx(sum(finals) / 3)
        assert row["kl"]["std"] == pytest.approx(statistics.stdev(finals))
    assert "euler_h0.1_reg0.07" in (out / "summary.md").read_text() and (out / "summary.png").exists()


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*ARGS, "--out", str(whole)]) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "odegan_kernels", *ARGS, "--out", str(cut)], env=env)
    ckpt = cut / "populations" / "p0" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    assert not (cut / "populations" / "p0" / "done.json").exists()
    assert main([*ARGS, "--out", str(cut)]) == 0
    a, b = (json.loads((r / "summary.json").read_text()) for r in (whole, cut))
    assert a["settings"] == b["settings"] and a["members"] == b["members"]
    for d in member_dirs(whole):
        e = cut / d.relative_to(whole)
        assert (d / "metrics.jsonl").read_text() == (e / "metrics.jsonl").read_text()
        pa, pb = torch.load(d / "params.pt"), torch.load(e / "params.pt")
        for player in ("D", "G"):
            assert all(torch.equal(pa[player][k], pb[player][k]) for k in pa[player])


def test_plan_and_bad_input(tmp_path):
    assert parse_seeds("0-3,8") == [0, 1, 2, 3, 8]
    pops = plan("mog", tmp_path, [0, 1, 2], [0.05, 0.1], [0.0, 0.07], ["euler", "rk4"], members=5)
    assert [len(p) for p in pops] == [5, 5, 2, 5, 5, 2]  # one method per population
    assert all(len({cfg.method for _, _, cfg in p}) == 1 for p in pops)
    for bad, msg in [("3-1", "empty"), ("a", "ranges and lists"), ("1,1", "distinct")]:
        with pytest.raises(ValueError, match=msg):
            parse_seeds(bad)
    with pytest.raises(ValueError, match="--members must be an int >= 1"):
        plan("mog", tmp_path, [0], members=0)
    with pytest.raises(ValueError, match="seed is a sweep axis"):
        plan("mog", tmp_path, [0], sets={"seed": 3})
    assert main(["sweep", "mog", "--seeds", "0-1", "--members", "0", "--out", str(tmp_path / "x")]) == 2


def _member_and_its_solo_run(tmp_path, args, setting):
    """Run the sweep ``args`` (its last seed's member of ``setting``), then `odegan train` with that member's
    config.json: (the member's params.pt, the solo run's checkpoint)."""
    assert main(args) == 0
    seed = args[args.index("--seeds") + 1].split(",")[-1]
    member = tmp_path / "sweep" / setting / f"seed{seed}"
    run = tmp_path / "solo"
    assert main(["train", "--config", str(member / "config.json"), "--out", str(run), "--no-progress"]) == 0
    return torch.load(member / "params.pt"), torch.load(run / "checkpoint.pt", weights_only=False)


def assert_players_close(mine: dict, solo: dict, tol: float = 1e-12) -> None:
    """Every D and G tensor of a member's params.pt within ``tol`` (relative to its largest value) of the solo run's."""
    for player in ("D", "G"):
        for name, ref in solo[player].items():
            rel = ((mine[player][name] - ref).abs().max() / ref.abs().max()).item()
            assert rel <= tol, f"{player}.{name} differs by {rel:.3g}"


def test_a_member_equals_odegan_train_with_its_config(tmp_path):
    """A sweep member's final parameters are those of `odegan train` run with the member's own config.json."""
    out = tmp_path / "sweep"
    args = ["sweep", "mog", "--seeds", "1,4", "--h", "0.05,0.2", "--method", "heun", "--steps", "20", "--set",
            "dtype=float64", "--set", "eval_every=10", "--set", "batch=32", "--set", "hidden=8",
            "--out", str(out)]  # fmt: skip
    mine, solo = _member_and_its_solo_run(tmp_path, args, "heun_h0.2_reg0.07")
    assert_players_close(mine, solo)


def test_a_digits_member_equals_odegan_train_with_its_config(tmp_path):
    """The digits (a conv pair with BatchNorm, the preset's cifar schedule): a sweep member's parameters and BN
    statistics are those of `odegan train` with its config.json, and so is its final classifier metric. Measured
    with the tensors of a player against that player's largest value: its conv biases before BatchNorm have a zero
    gradient and hold rounding noise (~1e-20) that differs between the runs, so no tolerance relative to themselves
    could be stated."""
    pytest.importorskip("sklearn", reason="the digits need scikit-learn (the [dev] and [digits] extras)")
    out = tmp_path / "sweep"
    args = ["sweep", "digits", "--seeds", "2", "--h", "0.02,0.04", "--steps", "20", "--set", "dtype=float64",
            "--set", "width=8", "--set", "eval_samples=100", "--out", str(out)]  # fmt: skip
    mine, solo = _member_and_its_solo_run(tmp_path, args, "rk4_h0.04_reg0.02")
    member = out / "rk4_h0.04_reg0.02" / "seed2"
    run = tmp_path / "solo"
    for player in ("D", "G"):
        scale = max(t.abs().max().item() for t in solo[player].values() if t.is_floating_point())
        assert any("running_var" in n for n in solo[player]) == (player == "G")
        for name, ref in solo[player].items():
            if not ref.is_floating_point():  # BN's num_batches_tracked
                assert torch.equal(mine[player][name], ref), name
                continue
            assert torch.isfinite(ref).all()
            rel = (mine[player][name] - ref).abs().max().item() / scale
            assert rel <= 1e-12, f"{player}.{name} differs by {rel:.3g} of the player's largest value"
    last = lambda path: [json.loads(r) for r in path.read_text().splitlines() if "fid_classifier" in r][-1]
    ours, theirs = last(member / "metrics.jsonl"), last(run / "metrics.jsonl")
    assert ours["step"] == theirs["step"] == 20
    for key in ("fid_classifier", "coverage", "score"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-9), key


def test_an_interrupted_digits_sweep_resumes_exactly(tmp_path):
    """A digits population stopped after its checkpoint at step 3 (an exception from the progress line, in
    process) resumes to exactly the uninterrupted run: parameters, BN statistics, the loaders' positions and the
    metrics, bit for bit."""
    pytest.importorskip("sklearn", reason="the digits need scikit-learn (the [dev] and [digits] extras)")
    from odegan_kernels.train.sweep import run_sweep

    class Stop(Exception):
        pass

    def stop_at_the_checkpoint(line):
        if "step 3," in line:
            raise Stop(line)

    sets = dict(width=8, batch=8, eval_samples=50, steps=6, log_every=2)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_sweep(plan("digits", whole, [0, 1], sets=sets), whole, ckpt_every=3, say=lambda line: None)
    with pytest.raises(Stop):
        run_sweep(plan("digits", cut, [0, 1], sets=sets), cut, ckpt_every=3, say=stop_at_the_checkpoint)
    state = torch.load(cut / "populations" / "p0" / "checkpoint.pt", weights_only=False)
    assert state["run"]["pstep"] == 3 and [p["batches"] for p in state["problems"]] == [12, 12]
    run_sweep(plan("digits", cut, [0, 1], sets=sets), cut, ckpt_every=3, say=lambda line: None)
    for d in member_dirs(whole):
        e = cut / d.relative_to(whole)
        assert (d / "metrics.jsonl").read_text() == (e / "metrics.jsonl").read_text()
        pa, pb = torch.load(d / "params.pt"), torch.load(e / "params.pt")
        for player in ("D", "G"):
            assert all(torch.equal(pa[player][k], pb[player][k]) for k in pa[player]), player


def _sweep_worker(rank, world, port, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    import torch.distributed as dist

    try:
        assert main([*ARGS, "--out", out]) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_populations_shared_out_across_ranks(tmp_path):
    """Under torchrun (two gloo ranks) population i trains on rank i mod 2, and the summary equals one process's."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*ARGS, "--out", str(one)]) == 0
    mp.start_processes(_sweep_worker, args=(2, port, str(two)), nprocs=2, join=True, start_method="spawn")
    assert (two / "populations" / "p0" / "trained_by_rank0").exists()
    assert (two / "populations" / "p1" / "trained_by_rank1").exists()
    assert not (two / "populations" / "p1" / "trained_by_rank0").exists()
    a, b = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert a["settings"] == b["settings"] and a["members"] == b["members"]


class _Planted:
    def __reduce__(self):
        return (os.system, ("touch PLANTED",))


def test_a_planted_population_checkpoint_is_refused_and_never_run(tmp_path, capsys, monkeypatch):
    """The sweep's own checkpoints are read as data (weights_only): a pickled object that would run code when
    loaded is refused in one line naming the file, and it never runs."""
    from odegan_kernels.train.sweep import POPULATIONS

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sw"
    ckpt = out / POPULATIONS / "p0" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"run": {"pstep": 1}, "params": _Planted()}, ckpt)
    assert main([*ARGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(ckpt) in err[0] and "could run code" in err[0], err
    assert not (tmp_path / "PLANTED").exists()


def test_a_sweep_folder_holds_one_sweep(tmp_path, capsys):
    """The same command again reads the finished populations back; other steps, seeds or options in the same folder
    are refused in one line naming what differs, never answered with the old results."""
    out = tmp_path / "sweep"
    base = ["sweep", "mog", "--seeds", "0,1", "--steps", "6", "--set", "batch=16", "--set", "hidden=4",
            "--set", "eval_every=3", "--out", str(out)]  # fmt: skip
    assert main(base) == 0
    first = (out / "summary.json").read_text()
    assert main(base) == 0 and json.loads((out / "summary.json").read_text())["members"] == json.loads(first)["members"]
    capsys.readouterr()
    for change, says in (
        (["--steps", "8"], "steps 6 there, 8 now"),
        (["--seeds", "0-2"], "members 1 setting(s) x seeds [0, 1] there, 1 setting(s) x seeds [0, 1, 2] now"),
        (["--set", "hidden=5"], "hidden 4 there, 5 now"),
    ):
        args = list(base)
        i = args.index(change[0]) if change[0] in args and change[0] != "--set" else len(args)
        args[i : i + 2] = change
        assert main(args) == 2
        err = capsys.readouterr().err
        assert says in err and "holds another sweep" in err and err.count("\n") == 1, err


def test_an_adam_preset_sweeps_over_seeds(tmp_path):
    """The Adam baseline has no method or h: a sweep of its preset over seeds sets neither (it was refused, blaming
    options the user never gave), and --h is refused as it is for `odegan train`."""
    out = tmp_path / "adam"
    assert main(["sweep", "mog-adam", "--seeds", "0,1", "--steps", "4", "--set", "batch=16", "--out", str(out)]) == 0
    members = json.loads((out / "summary.json").read_text())["members"]
    assert [m["seed"] for m in members] == [0, 1] and all(m["steps"] == 4 for m in members)
    assert main(["sweep", "mog-adam", "--seeds", "0", "--h", "0.1", "--out", str(tmp_path / "b")]) == 2


def test_vary_axes_share_or_split_populations(tmp_path):
    """--vary: a member option (r1) shares populations, any other option (batch) splits them; every member is still
    the solo run of its config.json, and the summary names each setting's values."""
    out = tmp_path / "sweep"
    args = ["sweep", "mog", "--seeds", "0,3", "--vary", "r1=0,0.5", "--vary", "batch=32,64", "--steps", "12",
            "--set", "dtype=float64", "--set", "eval_every=6", "--set", "hidden=8", "--set", "eval_samples=128",
            "--out", str(out)]  # fmt: skip
    mine, solo = _member_and_its_solo_run(tmp_path, args, "rk4_h0.1_reg0.07_r10.5_batch32")
    assert_players_close(mine, solo)
    plan_ = json.loads((out / "plan.json").read_text())
    assert [sorted({(o["r1"], o["batch"]) for _, _, o in p}) for p in plan_] == [
        [(0, 32), (0.5, 32)],
        [(0, 64), (0.5, 64)],
    ]
    rows = {r["setting"]: r for r in json.loads((out / "summary.json").read_text())["settings"]}
    assert rows["rk4_h0.1_reg0.07_r10.5_batch64"]["options"] == {"r1": 0.5, "batch": 64}
    assert list(rows["rk4_h0.1_reg0.07_r10.5_batch64"]["options"]) == ["r1", "batch"]
    assert len(rows) == 4 and all(r["seeds"] == 2 for r in rows.values())
    assert {float(json.loads((d / "config.json").read_text())["r1"]) for d in member_dirs(out)} == {0.0, 0.5}


@pytest.mark.parametrize(
    ("extra", "msg"),
    [
        (["--vary", "h=0.1,0.2"], r"own sweep flag \(--h\)"),
        (["--vary", "r1=1", "--set", "r1=2"], "both by --set and by --vary"),
        (["--vary", "r1=1", "--vary", "r1=2"], "given twice"),
        (["--vary", "r1=,"], "needs distinct values"),
        (["--vary", "r1=1,1.0"], "twice"),
        (["--vary", "bogus=1"], "unknown option 'bogus'"),
        (["--vary", "data=a/b,a-b"], "share the folder"),
        (["--vary", "r1=a,b"], "r1"),
        (["--vary", "r1"], "--vary needs KEY=V1,V2"),
        (["--vary", "steps=2,4"], "both by --steps and by --vary"),
        (["--vary", "device=cpu,cuda"], "device says how the sweep runs"),
        (["--vary", "ckpt_every=10,1000"], "ckpt_every says how the sweep runs"),
        (["--vary", "r1=-0.0,0"], "twice"),
        (["--vary", "data=" + "a" * 300 + ",b"], "more than a file name holds"),
        (["--vary", "data=数,据"], "share the folder"),
        # the second population's engine refuses its options: said before the first population trains
        (["--vary", "reg_method=double_backward,jvp", "--vary", "r1=0,1"], "double backward only"),
    ],
)
def test_bad_vary_is_refused_in_one_line(tmp_path, capsys, extra, msg):
    out = tmp_path / "x"
    assert main(["sweep", "mog", "--seeds", "0", "--steps", "2", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(msg, err), err
    assert not out.exists(), "a refused sweep leaves no folder, so its corrected command can use it"


def test_vary_values_named_apart_and_kept_whole(tmp_path):
    """Settings whose values differ past %g's six figures get their own folders (as do such step sizes); a
    list-valued option's values keep their commas; summary.json's options are exactly --vary's, in its order."""
    pops = plan("mog", tmp_path, [0], hs=[0.1234567, 0.1234568], vary={"r1": [0.1234567, 0.1234568]})
    assert sorted({name for p in pops for name, _, _ in p}) == [
        f"rk4_h{h}_reg0.07_r1{r}" for h in ("0.1234567", "0.1234568") for r in ("0.1234567", "0.1234568")
    ]
    assert {name for p in plan("mog", tmp_path, [0], hs=[0.1, 1e-05]) for name, _, _ in p} == {
        "rk4_h0.1_reg0.07", "rk4_h1e-05_reg0.07"}  # fmt: skip
    with pytest.raises(TypeError, match="must be a list of values"):
        plan("mog", tmp_path, [0], vary={"r1": 0.5})
    out = tmp_path / "s"
    args = ["sweep", "mog-adam", "--seeds", "0", "--steps", "2", "--vary", "r1=0,0.5", "--vary",
            "betas=[0.5,0.9],[0,0.99]", "--set", "hidden=8", "--set", "eval_samples=64", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["settings"]) == 4 and all(list(r["options"]) == ["r1", "betas"] for r in summary["members"])
    assert {tuple(r["options"]["betas"]) for r in summary["settings"]} == {(0.5, 0.9), (0.0, 0.99)}


def test_an_interrupted_sweep_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import odegan_kernels.train.sweep as sweep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    assert main(["sweep", "mog", "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "x")]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"odegan: interrupted; the same command resumes the sweep in {tmp_path / 'x'}"
