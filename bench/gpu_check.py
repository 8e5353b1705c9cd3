"""The GPU check, sized for the device time a session is lent (15 minutes in all, every machine start included).

    bash bench/gpu_check.sh quick [--dry-run]   # each never-run path once, and a reduced benchmark: <= 4 minutes
    bash bench/gpu_check.sh full [--dry-run]    # the rest: every size, the ResNets, NCCL: <= 8 minutes, after quick

(gpu_check.sh runs this module.) Every check is its own process with its own time limit, so one that hangs or
crashes (a CUDA error poisons its process) costs only itself, and the part starts no check once its budget is spent.
csrc's CUDA build runs in the background from the start; the checks that need it wait for it. Results go to $OUT
(or bench/results/gpu_<part>_<date>/), each written as it comes, at most 7 files, so a run cut short keeps what it
measured: gpu_check_<part>.log (everything printed), checks_<part>.jsonl (one line per check: status, seconds,
result or the output's tail), and the benchmarks' <name>_<part>.csv and .md.

--dry-run, on any machine (CI runs it: tests/test_gpu_check.py), lists every check with its GPU command, checks that
every GPU test it names exists (pytest --collect-only), then runs each check's CPU fallback at small sizes and
records it the same way, so the script cannot rot before a GPU comes. bench/EXPECTATIONS.md has the time estimate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = {"quick": 240, "full": 480}
MARGIN_S = 5  # kept for the summary at the end (a listing and removing the scratch folder: about a second)
PYTEST = ["{py}", "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]

# The quick check's Triton launches (tests/test_gpu_check.py counts their compiled variants on a CPU).
TRITON_TESTS = ["tests/test_gpu_paths.py", "-k", "triton or bfloat16 or opcheck"]
CSRC_TESTS = ["tests/test_gpu_paths.py", "-k", "csrc or opcheck"]
GRAPH_TESTS = [  # the whole-step graph against eager, every way a training run captures it
    "tests/test_graphs.py::test_captured_step_equals_eager_step",  # joint/first-stage, decoupled/after-step; h moves
    "tests/test_graphs.py::test_a_captured_population_step_equals_its_eager_step",  # 3 members captured (issue 20)
    "tests/test_gpu_paths.py::test_an_lr_scheduler_moves_h_between_replays",  # h moved by a torch lr scheduler
    # the penalty family, and a lazy R1
    "tests/test_penalties_in_optimisers.py::test_captured_step_with_every_penalty_equals_the_eager_step",
    "tests/test_graphs.py::test_no_host_sync_inside_the_step",
    "tests/test_graphs.py::test_graph_mode_with_loader_workers",
    "tests/test_graphs.py::test_closure_that_syncs_is_refused_leaving_the_current_stream_and_the_parameters",
    "tests/test_gpu_paths.py::test_trainer_weight_average_on_the_device",  # EMA after captured steps
    "tests/test_graphs.py::test_trainer_graph_mode_trains",  # a short mog run with cuda_graph=true (300 steps)
]
GRAPH_CPU_TESTS = [  # the same machinery's CPU side: fake-CUDA bookkeeping, static buffers, in-graph sampling
    "tests/test_graphs.py",
    "tests/test_penalties_in_optimisers.py::test_graph_mode_draws_from_the_default_generator_and_refreshes_the_std",
    "tests/test_gpu_paths.py::test_trainer_weight_average_on_the_device",
    "tests/test_gpu_paths.py::test_an_lr_scheduler_moves_h_between_replays",
]
FULL_TESTS = [  # every size of the kernel tests; the GPU tests quick leaves out
    "tests/test_ops.py",
    "tests/test_ema.py",
    "tests/test_custom_ops.py",
    "tests/test_flat.py",
    "tests/test_graphs.py::test_trainer_graph_mode_conditional_images",
    "tests/test_penalties_in_optimisers.py::test_trainer_graph_mode_with_the_penalty_family",
    # issue 20: members through the Triton and csrc stage ops' per-segment rows on the device, both engines
    "tests/test_gpu_paths.py::test_a_population_on_the_device_equals_its_solo_runs",
    # issue 20: a population under CUDA autocast against float64 (CUDA's autocast casts aten.convolution itself)
    "tests/test_population_autocast.py",
]


@dataclass
class Check:
    name: str
    what: str
    gpu: list[str] | None  # the command on a GPU ({py} {out} {tmp} {lib} {ngpu} filled in); None: not built yet
    cpu: list[str] | None = None  # the CPU fallback --dry-run runs
    limit: int = 60  # seconds on a GPU
    estimate: int = 0  # predicted seconds on an H200 (bench/EXPECTATIONS.md, "The GPU check's time")
    collect: list[str] | None = None  # GPU tests --dry-run collects (they exist), when it cannot run them
    after_build: bool = False  # waits for the csrc build (and loads its library)
    needs_lib: bool = False  # fails without running when the build left no library (else it would test nothing)
    background: bool = False  # started, and the part goes on
    env: dict = field(default_factory=dict)


def sh(line: str) -> list[str]:
    return line.split()


def checks(part: str) -> list[Check]:
    """The part's checks in the order they run. estimate: predicted seconds on an H200 (bench/EXPECTATIONS.md)."""
    build = Check(
        "csrc-build",
        "csrc with its CUDA kernels (CMake); in the background: the checks that need it wait",
        sh("bash csrc/build.sh --cuda"),
        sh("bash -n csrc/build.sh"),
        limit=150 if part == "quick" else 180,
        estimate=40 if part == "quick" else 55,
        background=True,
        env={"BUILD_DIR": "{tmp}/build-csrc", "PYTHON": "{py}", "CUDA_ARCHS": "90" if part == "quick" else "80;90"},
    )
    env = Check("env", "the device, driver, clocks, torch / CUDA / Triton versions", sh("{py} -m bench.gpu_check env"),
                sh("{py} -m bench.gpu_check env"), limit=30, estimate=5)  # fmt: skip
    cache = "{py} -m bench.triton_keys cache {tmp}/triton-cache --keys {tmp}/keys.json"
    compiles = Check("triton-compiles", "our Triton kernels' variants this run compiled (its Triton cache), and the "
                     "tests' recorded prediction", sh(cache), sh(cache), limit=20, estimate=3)  # fmt: skip
    if part == "quick":
        kernels = "{py} -m bench.kernels --providers foreach,foreach_list,triton,csrc --no-plot"
        kernels += " --out {out}/kernels_quick.csv"
        steps = "{py} -m bench.step --no-penalties --no-colab --no-plot --out {out}/step_quick.csv"
        return [
            env,
            build,
            Check(
                "triton-kernels",
                "each Triton kernel against the reference (every size class, fp32/fp64, unaligned, 11 segments, "
                "reg prefix, unread acc, bf16 refused), opcheck of the Triton ops",
                [*PYTEST, *TRITON_TESTS, "-p", "bench.triton_keys", "--triton-keys", "{tmp}/keys.json"],
                [*PYTEST, *TRITON_TESTS],
                limit=70,
                estimate=35,
            ),
            Check(
                "graphs",
                "the captured step against eager: RK4 joint and decoupled, first-stage and after-step penalty, h "
                "changed between replays (a schedule, a torch lr scheduler), the penalty family and a lazy R1, loader "
                "workers, no host sync, a syncing "
                "closure refused (in a subprocess), the EMA after captured steps, a short mog run with cuda_graph, a "
                "captured population",
                [*PYTEST, *GRAPH_TESTS],
                [*PYTEST, *GRAPH_CPU_TESTS],
                limit=90,
                estimate=55,
                collect=GRAPH_TESTS,
            ),
            Check(
                "csrc-kernels",
                "each csrc CUDA kernel against the reference (vector and scalar paths, grid-stride sqnorm past one "
                "wave, the large table), opcheck of the csrc ops on CUDA tensors",
                [*PYTEST, *CSRC_TESTS],
                [*PYTEST, *CSRC_TESTS],
                limit=40,
                estimate=12,
                after_build=True,
                needs_lib=True,
            ),
            Check(
                "kernel-bench",
                "stage, RK4 and sqnorm at P = 1e6, 8e6, 6.4e7 against the copy rate and foreach",
                sh(kernels + " --device cuda --sizes 1e6,8e6,6.4e7"),
                sh(kernels + " --device cpu --sizes 1e4"),
                limit=45,
                estimate=25,
                after_build=True,
            ),
            Check(
                "step-bench",
                "the toy pair and DCGAN b64 RK4 step: straightforward eager, ours, graph, parts, JAX, compile (last)",
                sh(steps + " --device cuda --models mlp,dcgan --dcgan-batch 64 --rep-ms 200 --compiled-step off"),
                sh(steps + " --device cpu --models mlp --rep-ms 5 --no-compile"),
                limit=110,
                estimate=100,
                after_build=True,
            ),
            compiles,
        ]
    steps = "{py} -m bench.step --no-plot --out {out}/step_full.csv"
    pops = "{py} -m bench.step --no-plot --no-jax-vmap --out {out}/population_full.csv"
    kernels = "{py} -m bench.kernels --no-plot --out {out}/kernels_full.csv"
    nccl = "{py} -m torch.distributed.run --standalone --nproc-per-node {n} -m bench.nccl_check --device {d}"
    return [
        env,
        build,
        Check(
            "step-bench-full",
            "DCGAN b64, ResNet b64 (with the penalty family and compile rows) and the 128x128 conditional ResNet b32",
            sh(
                steps + " --device cuda --models dcgan,resnet,resnet128 --dcgan-batch 64 --model-batch resnet128=32 "
                "--penalty-models dcgan,resnet --compile-models dcgan,resnet --rep-ms 200"
            ),
            sh(
                steps + " --device cpu --models mlp --model-batch mlp=64 --penalty-models mlp --compile-models dcgan "
                "--rep-ms 5"
            ),
            limit=200,
            estimate=160,
        ),  # fmt: skip
        Check(
            "kernel-bench-full",
            "every size (1e4 to 1e9) and provider (reference, per-tensor, foreach, foreach_list, compile)",
            sh(kernels + " --device cuda"),
            sh(kernels + " --device cpu --sizes 1e4 --providers reference,foreach,triton,csrc,per_tensor,foreach_list"),
            limit=100,
            estimate=90,
            after_build=True,
        ),
        Check(
            "gpu-tests",
            "the kernel and op test files on the GPU at all their sizes, the GPU tests quick does not run, a "
            "population on the device against its members' solo runs, and populations under autocast",
            [*PYTEST, *FULL_TESTS],
            [*PYTEST, "--collect-only", *FULL_TESTS],
            limit=130,
            estimate=100,
            after_build=True,
        ),
        Check(
            "nccl",
            "data-parallel RK4 over NCCL with the GPUs there are, eager and captured (one GPU: a group of one, "
            "nothing exchanged: a captured collective needs two GPUs to be checked)",
            sh(nccl.replace("{n}", "{ngpu}").replace("{d}", "cuda")),
            sh(nccl.replace("{n}", "1").replace("{d}", "cpu")),
            limit=40,
            estimate=25,
        ),
        Check(
            "populations",
            "K independent toy runs batched (bench.step --members K): member-steps/s against a solo run, both engines "
            "(the DCGAN population rows do not fit the full part's budget: bench/EXPECTATIONS.md)",
            sh(pops + " --members 1,16,64 --models mlp --device cuda --rep-ms 100"),
            sh(pops + " --members 1,2 --models mlp --device cpu --rep-ms 5"),
            limit=50,
            estimate=20,
        ),
        Check(
            "compiled-step",
            "the toy pair's compiled step (compile='step': the whole step one graph; then compile=True: the stage op, "
            "then the hand-derived engine too) against ours_mlp and JAX",
            sh(steps + " --device cuda --models mlp --compiled-step only --rep-ms 200"),
            # the CPU fallback checks the command line and the rows beside it; a cold compile here takes minutes
            sh(steps + " --device cpu --models mlp --compiled-step off --no-compile --no-penalties --rep-ms 5"),
            limit=150,
            estimate=72,
        ),  # fmt: skip
        compiles,
    ]


def fill(args: list[str], ctx: dict) -> list[str]:
    return [a.format(**ctx) for a in args]


class Part:
    """One part's run: its checks in order, the background build, the records and the budget."""

    def __init__(self, part: str, out: Path, dry: bool) -> None:
        self.part, self.out, self.dry = part, out, dry
        self.tmp = Path(tempfile.mkdtemp(prefix=f"odegan_gpu_{part}_"))
        self.ctx = {"py": sys.executable, "out": str(out), "tmp": str(self.tmp), "ngpu": str(gpu_count()),
                    "lib": str(self.tmp / "build-csrc" / "libodegan_kernels_csrc.so")}  # fmt: skip
        self.records = out / f"checks_{part}.jsonl"
        self.deadline = time.monotonic() + BUDGET_S[part] - MARGIN_S
        self.build: tuple[Check, subprocess.Popen, float, deque] | None = None
        self.statuses: list[tuple[str, str, float]] = []

    def env(self, check: Check) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get(
            "PYTHONPATH", "")]).rstrip(os.pathsep), TRITON_CACHE_DIR=str(self.tmp / "triton-cache"))  # fmt: skip
        if not self.dry:
            env["ODEGAN_SKIP_CSRC_BUILD"] = "1"  # never the on-demand build: the background one is the build
            if check.after_build and Path(self.ctx["lib"]).is_file():
                env["ODEGAN_CSRC_LIB"] = self.ctx["lib"]
        env.update({k: v.format(**self.ctx) for k, v in check.env.items()})
        return env

    def record(self, check: Check, status: str, seconds: float, tail=(), result=None, command=None) -> None:
        rec = {"check": check.name, "part": self.part, "dry_run": self.dry, "status": status,
               "seconds": round(seconds, 1), "limit": check.limit, "what": check.what}  # fmt: skip
        if command:
            rec["command"] = shlex.join(command)
        if result is not None:
            rec["result"] = result
        if status not in ("pass", "absent") and tail:
            rec["tail"] = list(tail)[-25:]
        with open(self.records, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.statuses.append((check.name, status, seconds))
        print(f"== {check.name}: {status} ({seconds:.1f} s)", flush=True)

    def start(self, argv: list[str], env: dict, tail: deque, echo: bool = True) -> subprocess.Popen:
        """argv in its own process group, its output copied to ours (the log) as it comes unless not echo (a
        background job's would interleave with the checks'), its last lines in tail."""
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)  # fmt: skip

        def pump() -> None:
            for line in proc.stdout:
                if echo:
                    sys.stdout.write(line)
                tail.append(line.rstrip("\n"))
            sys.stdout.flush()
            proc.ended = time.monotonic()  # (about) when it exited: its output closed

        threading.Thread(target=pump, daemon=True).start()
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float) -> str:
        try:
            code = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the check and everything it started, by its group id
            proc.wait()
            return "timeout"
        time.sleep(0.05)  # let the pump copy the last lines
        return "pass" if code == 0 else f"fail (exit {code})"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run_one(self, check: Check, argv: list[str]) -> None:
        timeout = min(check.limit, self.left())
        if timeout < 3:
            self.record(check, "skipped: out of time", 0.0, command=argv)
            return
        tail: deque = deque(maxlen=40)
        t0 = time.monotonic()
        print(f"\n== {check.name}: {check.what}\n   $ {shlex.join(argv)}", flush=True)
        status = self.wait(self.start(argv, self.env(check), tail), timeout)
        result = None
        if tail and tail[-1].startswith("{"):
            try:
                result = json.loads(tail[-1])
            except json.JSONDecodeError:
                pass
        self.record(check, status, time.monotonic() - t0, tail, result, argv)

    def finish_build(self) -> None:
        if self.build is None:
            return
        check, proc, t0, tail = self.build
        self.build = None
        status = self.wait(proc, min(check.limit - (time.monotonic() - t0), self.left()))
        if status == "pass" and check.name == "csrc-build" and not self.dry and not Path(self.ctx["lib"]).is_file():
            status = "fail (no library)"
        self.record(check, status, getattr(proc, "ended", time.monotonic()) - t0, tail)

    def run(self) -> int:
        listing = checks(self.part)
        print(f"== gpu_check {self.part}{' --dry-run' if self.dry else ''}: {len(listing)} checks, budget "
              f"{BUDGET_S[self.part]} s, results in {self.out}")  # fmt: skip
        for c in listing:
            cmd = shlex.join(fill(c.gpu, self.ctx)) if c.gpu else f"(not built: {c.what})"
            print(f"   {c.name:18s} {c.limit:4d} s  {cmd}")
        if self.dry:
            self.collect(listing)
        for check in listing:
            argv = check.cpu if self.dry else check.gpu
            if check.gpu is None:
                self.record(check, "absent", 0.0)
                continue
            argv = fill(argv, self.ctx)
            if check.background:
                tail: deque = deque(maxlen=40)
                print(f"\n== {check.name} (background): $ {shlex.join(argv)}", flush=True)
                t0 = time.monotonic()
                self.build = (check, self.start(argv, self.env(check), tail, echo=False), t0, tail)
                continue
            if check.after_build:
                self.finish_build()
            if check.needs_lib and not self.dry and not Path(self.ctx["lib"]).is_file():
                self.record(check, "fail (no csrc library: see csrc-build)", 0.0, command=argv)
                continue
            self.run_one(check, argv)
        self.finish_build()
        return self.summary()

    def collect(self, listing: list[Check]) -> None:
        """--dry-run: every GPU test a check names must exist, though it runs only on a GPU."""
        names = [t for c in listing for t in (c.collect or []) if t.startswith("tests/")]
        if not names:
            return
        check = Check("collect-gpu-tests", "the GPU tests the checks name exist (pytest --collect-only)", [], limit=60)
        self.run_one(check, fill([*PYTEST, "--collect-only", *names], self.ctx))

    def summary(self) -> int:
        print(f"\n== summary ({self.part}{', dry run' if self.dry else ''})")
        for name, status, seconds in self.statuses:
            print(f"   {name:18s} {status:24s} {seconds:6.1f} s")
        for md in sorted(self.out.glob("*.md")):  # the benchmarks' ratios: what the targets are read from
            text = md.read_text()
            if "## Ratios" in text:
                print(f"\n{md.name}:" + text[text.index("## Ratios") :].split("\n", 1)[1].rstrip()[:3000])
        files = sorted(p.name for p in self.out.iterdir())
        print(f"\n   results: {self.out} ({len(files)} files: {', '.join(files)})")
        shutil.rmtree(self.tmp, ignore_errors=True)
        bad = [n for n, s, _ in self.statuses if s not in ("pass", "absent")]
        return 1 if bad else 0


def gpu_count() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:
        return 1


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, gpus=torch.cuda.device_count(), sms=p.multi_processor_count,
                    memory_GiB=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")  # fmt: skip
        if shutil.which("nvidia-smi"):
            q = "--query-gpu=driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.limit"
            res = subprocess.run(["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True)
            info["nvidia_smi"] = res.stdout.strip()
    else:
        info.update(device=f"CPU ({platform.machine()}, {os.cpu_count()} cores)", gpus=0)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["quick", "full", "env"])
    ap.add_argument("--dry-run", action="store_true", help="list the checks and run their CPU fallbacks")
    args = ap.parse_args(argv)
    if args.part == "env":
        print(json.dumps(environment()))
        return 0
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results" / f"gpu_{args.part}_{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device here: run with --dry-run for the CPU fallbacks", file=sys.stderr)
            return 2
    return Part(args.part, out, args.dry_run).run()


if __name__ == "__main__":
    sys.exit(main())
