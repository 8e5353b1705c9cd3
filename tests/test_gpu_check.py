"""bench/gpu_check.sh, tested without a GPU: both parts' --dry-run list every check and run each one's CPU fallback,
the driver keeps its budget (time limits, killed process groups, skips once the budget is spent, a record per
check as it goes), the step benchmark compiles each model once, and the quick check's Triton launches compile few
variants (counted with Triton's own binder and compiled for sm_90 here)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool returns


def dry_run(part: str, out: Path) -> tuple[int, str, list[dict]]:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # each check's own process decides (conftest sets it for pytest on a CPU)
    res = subprocess.run(["bash", "bench/gpu_check.sh", part, "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    records = [json.loads(line) for line in (out / f"checks_{part}.jsonl").read_text().splitlines()]
    return res.returncode, res.stdout + res.stderr, records


@pytest.mark.parametrize("part", ["quick", "full"])
def test_dry_run_lists_every_check_and_runs_its_cpu_fallback(part, tmp_path):
    code, output, records = dry_run(part, tmp_path)
    assert code == 0, output[-6000:]
    listed = gpu_check.checks(part)
    by_name = {r["check"]: r for r in records}
    for check in listed:
        assert check.name in by_name, f"{check.name}: no record"
        rec = by_name[check.name]
        assert rec["dry_run"] and rec["part"] == part
        if check.gpu is None:
            assert rec["status"] == "absent", rec
        else:
            assert rec["status"] == "pass", rec
            # the listing shows the GPU command (its first words, placeholders filled)
            assert re.search(rf"^   {re.escape(check.name)} .*{re.escape(check.gpu[-1].split('/')[-1])}", output, re.M)
    if part == "quick":  # the GPU-only tests it names exist
        assert by_name["collect-gpu-tests"]["status"] == "pass"
    files = sorted(tmp_path.iterdir())
    assert len(files) <= 7 and all(f.is_file() and NAME.match(f.name) for f in files), files
    assert (tmp_path / f"gpu_check_{part}.log").read_text().count("== summary") == 1
    bench_rows = (tmp_path / f"kernels_{part}.csv").read_text().splitlines()
    assert len(bench_rows) > 3 and "copy" in bench_rows[1], "the kernel benchmark's fallback wrote no rows"
    assert "ours" in (tmp_path / f"step_{part}.csv").read_text()


def test_the_parts_fit_their_budgets():
    """The predicted seconds of each part's checks (bench/EXPECTATIONS.md has their arithmetic) fit its budget, the
    background build overlapping the checks before the first that needs it; each limit is at least its prediction,
    and the build starts first."""
    for part, budget in gpu_check.BUDGET_S.items():
        listing = gpu_check.checks(part)
        assert [c.name for c in listing][:2] == ["env", "csrc-build"], "the build must start first"
        assert all(c.estimate <= c.limit <= 600 for c in listing), "one device command is at most 10 minutes"
        build = listing[1]
        first_user = next(i for i, c in enumerate(listing) if c.after_build)
        before = sum(c.estimate for c in listing[2:first_user])
        total = sum(c.estimate for c in listing if not c.background) + max(0, build.estimate - before)
        assert total <= budget - gpu_check.MARGIN_S, (part, total)
    assert gpu_check.BUDGET_S == {"quick": 240, "full": 480}
    names = [c.name for c in gpu_check.checks("quick")]
    assert "nccl" not in names, "NCCL in a captured step cannot be checked on one GPU: it belongs to full"


def _fake_checks(tmp_path, py):
    pidfile = tmp_path / "pid"
    sleeper = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    return pidfile, [
        gpu_check.Check("build", "a background job", [py, "-c", "import time; time.sleep(1); print('built')"],
                        limit=30, background=True),
        gpu_check.Check("json", "prints a result", [py, "-c", "print('x'); print('{{\"variants\": 3}}')"],
                        after_build=True),
        gpu_check.Check("needs-lib", "tests the csrc library", [py, "-c", "pass"], after_build=True, needs_lib=True),
        gpu_check.Check("fails", "exits 3", [py, "-c", "print('boom'); raise SystemExit(3)"]),
        gpu_check.Check("hangs", "outlives the budget", [py, "-c", sleeper], limit=30),
        gpu_check.Check("late", "after the budget", [py, "-c", "pass"]),
        gpu_check.Check("absent", "not built", None),
    ]  # fmt: skip


def test_the_driver_keeps_its_budget_and_records_every_check(tmp_path, monkeypatch):
    pidfile, fake = _fake_checks(tmp_path, sys.executable)
    monkeypatch.setattr(gpu_check, "checks", lambda part: fake)
    monkeypatch.setitem(gpu_check.BUDGET_S, "quick", 8 + gpu_check.MARGIN_S)  # 'hangs' spends what is left
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.monotonic()
    code = gpu_check.Part("quick", out, dry=False).run()
    assert code == 1 and time.monotonic() - t0 < 20
    recs = {r["check"]: r for r in map(json.loads, (out / "checks_quick.jsonl").read_text().splitlines())}
    assert list(recs) == ["build", "json", "needs-lib", "fails", "hangs", "late", "absent"]  # in the order they ended
    assert recs["needs-lib"]["status"].startswith("fail (no csrc library")  # the fake build made none
    assert recs["build"]["status"] == "pass" and 0.9 < recs["build"]["seconds"] < 5
    assert recs["json"]["status"] == "pass" and recs["json"]["result"] == {"variants": 3}
    assert recs["fails"]["status"] == "fail (exit 3)" and "boom" in recs["fails"]["tail"]
    assert recs["hangs"]["status"] == "timeout" and recs["hangs"]["seconds"] < 10  # cut at the deadline
    with pytest.raises(ProcessLookupError):  # the timed-out check's process is gone
        os.kill(int(pidfile.read_text()), 0)
    assert recs["late"]["status"] == "skipped: out of time" and recs["absent"]["status"] == "absent"


def test_the_step_benchmark_compiles_each_model_once(monkeypatch):
    """Item 5 of issue 22: the compile_fd row reuses the compiled modules of the failed double-backward attempt."""
    from bench import step

    compiled, rows = [], []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)
    real_closure = step.closure_for

    def closure_for(D, G, real, z, reg_method="double_backward", engine="autograd"):
        inner = real_closure(D, G, real, z, reg_method=reg_method, engine=engine)
        if reg_method == "double_backward":
            raise RuntimeError("torch.compile with aot_autograd does not currently support double backward")
        return inner

    monkeypatch.setattr(step, "closure_for", closure_for)
    record = lambda variant, fn, note="", params=None: (fn(), rows.append(variant))  # noqa: E731
    step.record_compile_rows("mlp", torch.device("cpu"), 32, record, lambda variant, note="": rows.append(variant))
    assert len(compiled) == 2 and rows == ["compile", "compile_fd"]


@pytest.mark.slow
def test_the_quick_check_compiles_few_triton_variants(tmp_path):
    """Every Triton launch the quick check makes (its kernel tests at their GPU sizes, the kernel benchmark at 1e6 and
    8e6, whose 6.4e7 launches share 8e6's block size and alignment, and one eager step of each model and coupling the
    graph and step checks run), keyed as Triton's binder keys them for sm_90: few distinct variants (before issue 22
    the sum kernel's loop bound alone compiled one per number of chunks), each compiles here, and compiling them
    writes exactly that many entries to a fresh Triton cache."""
    keys = tmp_path / "keys.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    steps = "mlp,dcgan,mog-decoupled,mog-penalties"
    cmd = [sys.executable, "-m", "bench.triton_keys", "count", "--out", str(keys), "--kernels", "1e6,8e6", "--steps",
           steps, "--pytest", " ".join(f"'{a}'" if " " in a else a for a in gpu_check.TRITON_TESTS)]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    counted = json.loads(res.stdout.strip().splitlines()[-1])
    assert counted["per_kernel"]["stage"] >= 10 and counted["launches"] > 100, counted  # it saw the launches
    assert counted["variants"] <= 40, counted
    env = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    res = subprocess.run([sys.executable, "-m", "bench.triton_keys", "compile", str(keys)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["compiled"] == counted["variants"]
    res = subprocess.run([sys.executable, "-m", "bench.triton_keys", "cache", str(tmp_path / "cache")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert json.loads(res.stdout.strip().splitlines()[-1])["variants"] == counted["variants"]
