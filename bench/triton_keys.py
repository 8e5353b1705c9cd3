"""How many Triton variants a GPU run compiles, found on any machine.

Triton compiles a kernel once per specialisation key: its constexprs, its options (num_warps) and what its runtime
binder reads off the arguments (dtypes, pointers' 16-byte alignment, ints equal to 1 or divisible by 16 unless
not specialised on). A recorder wraps every kernel of the Triton backend (ops.triton_kernels.KERNELS) and computes,
for each launch, the key Triton's own binder gives for an sm_90 device; on a CPU the kernels still run, under
TRITON_INTERPRET=1, and the host paths a GPU takes are switched on (the sqnorm capture path's warm-up). Each
distinct key is then compiled for sm_90 with Triton's ptxas, timed: what the GPU run pays before its first result.

    python -m bench.triton_keys count --out keys.json [--pytest "tests/test_gpu_paths.py -k triton"]
           [--kernels 1e6,8e6] [--steps mlp,dcgan,mog-decoupled,mog-penalties]    # (re-runs itself interpreted)
    python -m bench.triton_keys compile keys.json                                 # (not interpreted)
    python -m pytest -p bench.triton_keys --triton-keys keys.json ...             # record a pytest run's keys
    python -m bench.triton_keys cache DIR [--keys keys.json]                       # variants in a Triton cache

On a GPU the same recorder (the plugin) predicts what the run compiles, and `cache` counts what it did compile:
the entries of our kernels in $TRITON_CACHE_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_ARCH = 90


def _kernels() -> dict:
    from odegan_kernels.ops import triton_kernels

    return triton_kernels.KERNELS


class Recorder:
    """Wraps every Triton kernel's run: each launch's sm_90 specialisation key is recorded, then it runs as before."""

    def __init__(self) -> None:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        self.backend = make_backend(GPUTarget("cuda", TARGET_ARCH, 32))
        self.keys: dict[str, dict[str, dict]] = {}
        self.launches = 0
        self.binders = {}
        self.wrapped = []
        for name, kernel in _kernels().items():
            # under the interpreter the kernel is an InterpretedFunction: a JITFunction of the same function and
            # options has the binder a GPU launch uses
            jf = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
            self.binders[name] = (jf, create_function_from_signature(jf.signature, jf.params, self.backend))
        self.knobs = triton.knobs
        self.pack = triton.runtime.jit.JITFunction._pack_args  # what JITFunction.run hands the compiler

    def install(self) -> Recorder:
        from odegan_kernels.ops import triton_sqnorm

        triton_sqnorm.CAPTURE_WARMUP_DEVICES.add("cpu")  # a GPU's eager calls warm the capture path: so do these
        for name, kernel in _kernels().items():
            self.wrapped.append(kernel)
            kernel.run = self.wrap(name, kernel.run)
        return self

    def uninstall(self) -> None:
        from odegan_kernels.ops import triton_sqnorm

        triton_sqnorm.CAPTURE_WARMUP_DEVICES.discard("cpu")
        for kernel in self.wrapped:
            del kernel.run  # the class's run again
        self.wrapped = []

    def wrap(self, name: str, run):
        def recording_run(*args, grid, warmup, **kwargs):
            self.record(name, args, kwargs)
            return run(*args, grid=grid, warmup=warmup, **kwargs)

        return recording_run

    def record(self, name: str, args, kwargs) -> None:
        jf, binder = self.binders[name]
        kw = dict(kwargs)  # as JITFunction.run completes the options before binding
        kw["debug"] = kw.get("debug", jf.debug) or self.knobs.runtime.debug
        kw["instrumentation_mode"] = self.knobs.compilation.instrumentation_mode
        bound, specialization, options = binder(*args, **kw)
        key = repr((tuple(specialization), str(options)))
        self.launches += 1
        if key in self.keys.setdefault(name, {}):
            return
        _, signature, constexprs, attrs = self.pack(jf, self.backend, kw, bound, specialization, options)
        self.keys[name][key] = {
            "signature": signature,
            "constexprs": [[list(path), value] for path, value in constexprs.items()],
            "attrs": [[list(path), value] for path, value in attrs.items()],
            "num_warps": kw.get("num_warps", 4),
        }

    def save(self, path: Path) -> dict:
        """Merge this recorder's keys into the JSON at path (several processes may add to one file)."""
        data = load(path) if path.exists() else {"kernels": {}, "launches": 0}
        for name, keys in self.keys.items():
            data["kernels"].setdefault(name, {}).update(keys)
        data["launches"] += self.launches
        path.write_text(json.dumps(data, indent=1, sort_keys=True))
        return data


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def summary(data: dict) -> dict:
    """Distinct variants per kernel and in all."""
    per = {name: len(keys) for name, keys in sorted(data["kernels"].items())}
    return {"variants": sum(per.values()), "per_kernel": per, "launches": data["launches"]}


# -- the pytest plugin: -p bench.triton_keys --triton-keys PATH ----------------------------------------------
_session: dict = {}


def pytest_addoption(parser) -> None:
    parser.addoption("--triton-keys", default=None, help="record the Triton launches' sm_90 keys into this JSON")


def pytest_configure(config) -> None:
    path = config.getoption("--triton-keys")
    if path:
        _session["recorder"] = Recorder().install()
        _session["path"] = Path(path)


def pytest_sessionfinish(session, exitstatus) -> None:
    rec = _session.pop("recorder", None)
    if rec is not None:
        rec.uninstall()
        data = rec.save(_session.pop("path"))
        print(f"\ntriton keys: {json.dumps(summary(data))}")


# -- what the benchmarks launch -----------------------------------------------------------------------------
def record_kernel_bench(sizes: list[int]) -> None:
    """bench.kernels' Triton calls at these sizes, each run once (its timer replaced): every launch it makes."""
    import torch

    from . import kernels

    kernels.bench = lambda fn, device, **kw: (fn(), (1.0, 1.0, 1.0))[1]
    with tempfile.TemporaryDirectory() as tmp:
        kernels.run(torch.device("cpu"), sizes, ["triton"], Path(tmp) / "k.csv", plot=False)


def record_steps(names: list[str]) -> None:
    """One eager RK4 step per model through the Triton backend: the stage and sqnorm launches of the stepper's
    step (a captured step launches the same variants: the capture path's are warmed eagerly)."""
    import torch

    from odegan_kernels import Batch, FlatParams, ODEStepper, game_gradients
    from odegan_kernels.models import mog_pair

    from . import step

    os.environ["ODEGAN_BACKEND"] = "triton"
    cpu = torch.device("cpu")
    for name in names:
        if name in ("mlp", "dcgan", "resnet", "resnet128"):
            D, G, real, z = step.make_models(name, cpu, 4 if name != "mlp" else 64)
            _, st = step.stepper_for(D, G)
            st.step(step.closure_for(D, G, real, z))
            continue
        D, G = mog_pair(seed=0)
        x, z = torch.randn(4, 64, 2), torch.randn(4, 64, 32)
        if name == "mog-decoupled":
            st = ODEStepper(FlatParams(D=D, G=G), "rk4", h=0.1, reg=0.07, coupling="decoupled", reg_at="after_step")
            pens = None
        elif name == "mog-penalties":
            pens = {"r1": 1.0, "r2": 0.5, "wgan_gp": 1.0, "consensus": 0.1}
            st = ODEStepper(FlatParams(D=D, G=G), "rk4", h=0.05, reg=0.07, penalties=pens)
        else:
            raise ValueError(f"unknown step {name!r}")
        mix = torch.rand(4, 64)
        st.step(
            lambda s: game_gradients(
                D, G, Batch(x[s.index], z[s.index], mix=mix[s.index]), players=s.players, penalties=s.penalties
            )
        )


def count(args) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":  # the interpreter is chosen when triton is first imported
        env = dict(os.environ, TRITON_INTERPRET="1", ODEGAN_GPU_SIZES="1")
        return subprocess.run([sys.executable, "-m", "bench.triton_keys", *sys.argv[1:]], env=env).returncode
    out = Path(args.out)
    out.unlink(missing_ok=True)
    if args.pytest:
        import pytest

        code = pytest.main([*shlex.split(args.pytest), "-q", "-p", "no:cacheprovider", "-p", "bench.triton_keys",
                            "--triton-keys", str(out)])  # fmt: skip
        if code != 0:
            print(f"pytest failed ({code}): its keys are recorded all the same")
    rec = Recorder().install()
    try:
        if args.kernels:
            record_kernel_bench([int(float(v)) for v in args.kernels.split(",")])
        if args.steps:
            record_steps(args.steps.split(","))
    finally:
        rec.uninstall()
    data = rec.save(out)
    print(json.dumps(summary(data)))
    return 0


def compile_keys(path: Path) -> dict:
    """Compile every recorded variant for sm_90 (Triton's ptxas); returns the count and the seconds it took."""
    import triton
    from triton.backends.compiler import GPUTarget

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile runs the real compiler: unset TRITON_INTERPRET")
    target = GPUTarget("cuda", TARGET_ARCH, 32)
    kernels, data = _kernels(), load(path)
    n, t0 = 0, time.perf_counter()
    for name, keys in data["kernels"].items():
        for entry in keys.values():
            src = triton.compiler.ASTSource(
                fn=kernels[name],
                signature=entry["signature"],
                constexprs={tuple(p): v for p, v in entry["constexprs"]},
                attrs={tuple(p): v for p, v in entry["attrs"]},
            )
            triton.compile(src, target=target, options={"num_warps": entry["num_warps"]})
            n += 1
    return {"compiled": n, "seconds": round(time.perf_counter() - t0, 1)}


def cache_variants(cache: Path) -> dict:
    """Our kernels' compiled variants in a Triton cache folder (one <kernel name>.json per compile)."""
    names = {k.fn.__name__ for k in _kernels().values()}
    per: dict[str, int] = {}
    for meta in Path(cache).glob("*/*.json"):
        if meta.stem in names:
            per[meta.stem] = per.get(meta.stem, 0) + 1
    return {"variants": sum(per.values()), "per_kernel": dict(sorted(per.items()))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("count", help="record the keys of a pytest run, the kernel benchmark and model steps")
    c.add_argument("--out", required=True)
    c.add_argument("--pytest", default="", help="pytest arguments (one string)")
    c.add_argument("--kernels", default="", help="bench.kernels sizes, e.g. 1e6,8e6")
    c.add_argument("--steps", default="", help="mlp, dcgan, resnet, resnet128, mog-decoupled, mog-penalties")
    k = sub.add_parser("compile", help="compile every recorded key for sm_90")
    k.add_argument("keys")
    q = sub.add_parser("cache", help="our kernels' variants in a Triton cache folder")
    q.add_argument("dir")
    q.add_argument("--keys", default=None, help="and the variants a recording predicted (its JSON, if there)")
    args = ap.parse_args(argv)
    if args.cmd == "count":
        return count(args)
    if args.cmd == "compile":
        print(json.dumps({**summary(load(Path(args.keys))), **compile_keys(Path(args.keys))}))
        return 0
    res = cache_variants(Path(args.dir))
    if args.keys and Path(args.keys).is_file():
        res["recorded_by_the_plugin"] = summary(load(Path(args.keys)))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
