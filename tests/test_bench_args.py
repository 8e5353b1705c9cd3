"""The benchmarks' command lines refuse what they cannot measure: one line naming the option and exit 2, never
a traceback from inside the first kernel and never an exit 0 that measured nothing (issue 18, item 19)."""

from __future__ import annotations

import pytest
import torch

from bench import kernels, profile_step, step


def refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("main", [kernels.main, step.main], ids=["kernels", "step"])
def test_a_device_that_is_not_here_is_named(main, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = ["--out", str(tmp_path / "x.csv"), "--no-plot"]
    assert "no CUDA device here" in refused(main, ["--device", "cuda", *out], capsys)
    assert "--device 'tpu'" in refused(main, ["--device", "tpu", *out], capsys)
    assert "must be cpu or cuda" in refused(main, ["--device", "meta", *out], capsys)
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--max-p", "-5"], "--max-p must be a positive size"),
        (["--max-p", "100"], "nothing to measure"),
        (["--providers", "bogus"], "unknown ['bogus']"),
        (["--providers", "foreach,bogus"], "unknown ['bogus']"),
        (["--providers", ","], "--providers"),
        (["--sizes", "0"], "--sizes must be positive"),
        (["--sizes", "1e999"], "comma-separated numbers"),
    ],
)
def test_kernels_refuses_a_sweep_that_measures_nothing(argv, says, capsys, tmp_path):
    out = tmp_path / "k.csv"
    assert says in refused(kernels.main, ["--device", "cpu", "--out", str(out), "--no-plot", *argv], capsys)
    assert not out.exists()


def test_kernels_names_a_provider_that_cannot_run_on_the_device(capsys, tmp_path, monkeypatch):
    from odegan_kernels import ops

    monkeypatch.setattr(ops, "supports", lambda backend, device: backend in ("reference", "foreach"))
    line = refused(kernels.main, ["--device", "cpu", "--providers", "csrc", "--out", str(tmp_path / "k.csv")], capsys)
    assert "none of them runs on cpu" in line and "csrc" in line


def test_kernels_still_measures_a_valid_sweep(tmp_path):
    out = tmp_path / "k.csv"
    argv = ["--device", "cpu", "--sizes", "1000", "--providers", "foreach", "--out", str(out), "--no-plot"]
    assert kernels.main(argv) == 0
    rows = [r.split(",")[:2] for r in out.read_text().splitlines()[1:]]
    assert rows == [["copy", "torch"]] + [[op, "foreach"] for op in ("stage", "rk4", "sqnorm", "ema")]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--preset", "nosuch"], "invalid choice: 'nosuch'"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--rows", "-1"], "--rows must be at least 1"),
        (["--preset", "cifar10"], "needs --data PATH"),
        (["--preset", "imagefolder", "--data", "no/such/folder"], "does not exist"),
    ],
)
def test_profile_step_refuses_bad_options(argv, says, capsys):
    assert says in refused(profile_step.main, argv, capsys)


@pytest.mark.parametrize("members", ["0", "4,-1", "x"])
def test_step_refuses_bad_population_sizes(members, capsys):
    with pytest.raises(SystemExit) as e:
        step.main(["--members", members])
    assert e.value.code == 2 and "--members takes population sizes >= 1" in capsys.readouterr().err


def test_step_population_rows(tmp_path, capsys):
    """The population rows measure what they name: K=2 members' steps per second, and the solo runs'."""
    out = tmp_path / "pop.csv"
    assert step.main(["--members", "2", "--models", "mlp", "--rep-ms", "50", "--out", str(out)]) == 0
    text = out.read_text()
    assert "pop_mlp,2," in text and "pop_autograd,2," in text
    from bench import jax_step

    if jax_step.available():  # JAX's vmap of the same step, in the same run
        assert "jax_solo,1," in text and "jax_vmap,2," in text and "jax_vmap_scan,2," in text
    assert "member-steps/s" in capsys.readouterr().out


def test_population_ab_refuses_an_empty_population(capsys):
    from bench import population_ab

    assert "--members and --rounds must be at least 1" in refused(population_ab.main, ["--members", "0"], capsys)


def test_the_main_job_ab_runs_options_the_trainer_takes(tmp_path):
    """bench/main_job_ab.py's main job: every --set it passes is an option the trainer knows, with the value it says
    (a misspelt one would be refused and the A/B would time an error message)."""
    import subprocess

    from bench import main_job_ab

    cmd = main_job_ab.main_job_cmd(100, tmp_path / "run", compile=True) + ["--dry-run"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for line in ("eval_every = 1000000000", "plot_every = 1000000000", "tensorboard = false", "compile = true"):
        assert line in done.stdout
    assert main_job_ab.jax_cmd(100, tmp_path)[2:4] == ["bench.jax_mog", "--steps"]


def test_step_population_refuses_a_pair_it_has_no_population_for(capsys):
    says = "--members takes --models mlp, dcgan or mlp,dcgan"
    assert says in refused(step.main, ["--members", "2", "--models", "resnet"], capsys)


def test_population_dcgan_rows(tmp_path, capsys):
    """The DCGAN rows (batch 2 here, to stay cheap): the solo run's steps/s, then each population's member-steps/s
    and its ratio to the solo run; on a CPU a K over the cap is left out, and says so."""
    import csv
    import math

    from bench import population
    from bench.common import environment

    cpu = torch.device("cpu")
    out = tmp_path / "pop.csv"
    k_big = population.DCGAN_CPU_MAX_MEMBERS + 1
    rows = population.dcgan_rows([1, 2, k_big], cpu, 1.0, environment(cpu), out, batch=2)
    expected = [("solo_dcgan_b2", 1), ("pop_dcgan_b2", 1), ("pop_dcgan_b2", 2)]
    assert [(r["variant"], r["members"]) for r in rows] == expected
    assert f"K > {population.DCGAN_CPU_MAX_MEMBERS} left out on a CPU ([{k_big}])" in capsys.readouterr().out
    written = list(csv.DictReader(out.open()))
    assert [w["variant"] for w in written] == [r["variant"] for r in rows]
    solo = float(written[0]["member_steps_s"])
    for w in written:
        rate = float(w["member_steps_s"])
        assert math.isfinite(rate) and rate > 0, w
        assert math.isclose(float(w["vs_solo"]), rate / solo, rel_tol=1e-9), w
