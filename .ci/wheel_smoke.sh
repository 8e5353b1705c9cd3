#!/usr/bin/env bash
# The package as a user gets it: build the wheel (and the sdist) from the files git knows, install the wheel
# into a fresh virtual environment outside the checkout, and use it from a folder outside the checkout:
# import, `odegan backends`, the CPU build of the csrc library from the installed sources, one call of each
# csrc op against the reference, and a short training run. CI runs it after the test suite.
#
#   bash .ci/wheel_smoke.sh                    everything (a few minutes: the fresh venv installs torch)
#   bash .ci/wheel_smoke.sh --build-only DIR   only build the wheel and the sdist into DIR (tests/test_packaging.py)
#
# Builds from a copy of the files git knows (tracked, or new and not ignored), so the checkout gets no build/
# and an earlier build's leftovers cannot slip into the wheel. PYTHON (default: python) runs pip and build;
# KEEP=1 keeps the scratch folder.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
mode=all
if [ "${1:-}" = --build-only ]; then
  mode=build-only
  [ -n "${2:-}" ] || { echo "usage: bash .ci/wheel_smoke.sh [--build-only DIR]" >&2; exit 2; }
  mkdir -p "$2"
  dist=$(cd "$2" && pwd)
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/odegan-wheel-smoke.XXXXXX")
[ "${KEEP:-0}" = 1 ] && echo "scratch folder: $work" || trap 'rm -rf "$work"' EXIT
[ "$mode" = all ] && dist=$work/dist
step() { echo "== $* ($(( $(date +%s) - t_start )) s)"; }
t_start=$(date +%s)

step "copy the sources"
mkdir -p "$work/src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard) |
  while IFS= read -r -d '' f; do if [ -e "$root/$f" ]; then printf '%s\0' "$f"; fi; done |
  (cd "$root" && tar --null -T - -cf -) | tar -xf - -C "$work/src"

step "build the wheel and the sdist"
(cd "$work/src" && "$PY" -m pip wheel -q --no-deps -w "$dist" .)
"$PY" -m build --sdist --outdir "$dist" "$work/src" > "$work/sdist.log" 2>&1 || { cat "$work/sdist.log"; exit 1; }
ls -l "$dist"
if [ "$mode" = build-only ]; then
  exit 0
fi

step "install the wheel into a fresh venv"
"$PY" -m venv "$work/venv"
vpy=$work/venv/bin/python
# The venv's bundled pip may predate the cache format of the pip that downloaded torch before: a current
# pip finds those downloads in the cache instead of fetching several GB again.
"$vpy" -m pip install -q --upgrade pip
"$vpy" -m pip install -q -c "$root/constraints.txt" "$dist"/*.whl

# From here on: outside the checkout, nothing from it on the path, and a torch extensions cache of our own,
# so the csrc library is built from the installed package's sources rather than found from earlier builds.
mkdir -p "$work/outside"
cd "$work/outside"
unset PYTHONPATH
export TORCH_EXTENSIONS_DIR=$work/torch_extensions
unset ODEGAN_CSRC_LIB ODEGAN_BACKEND

step "import"
"$vpy" - "$root" <<'EOF'
import sys
from pathlib import Path

import odegan_kernels
from odegan_kernels.ops import csrc

root = Path(sys.argv[1])
here = Path(odegan_kernels.__file__).resolve()
assert root not in here.parents, f"imported from the checkout: {here}"
missing = [s for s in csrc.CPU_SOURCES + csrc.CUDA_SOURCES + ("ops.h",) if not (csrc.CSRC / s).is_file()]
assert not missing, f"the installed package lacks its C++/CUDA sources: {missing} in {csrc.CSRC}"
print("odegan_kernels from", here.parent)
EOF

step "odegan backends (before the build)"
"$work/venv/bin/odegan" backends | tee "$work/backends.txt"
grep -q csrc "$work/backends.txt"
"$vpy" -c 'from odegan_kernels import ops; why = ops.why_unavailable("csrc"); assert why and "not built" in why, why'

step "python -m odegan_kernels.ops.csrc build"
"$vpy" -m odegan_kernels.ops.csrc build > "$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
tail -1 "$work/build.log"

step "odegan backends (after the build)"
"$work/venv/bin/odegan" backends

step "the csrc ops against the reference"
"$vpy" - <<'EOF'
import os

import torch

from odegan_kernels import ops
from odegan_kernels.ops import csrc

gen = torch.Generator().manual_seed(0)
n, segs = 10007, [(0, 3001), (3001, 10007)]
g, x0, acc = (torch.randn(n, generator=gen) for _ in range(3))
coeffs, reg = torch.randn(2, 5, generator=gen), torch.randn(4000, generator=gen)
out = {}
for backend in ("reference", "csrc"):
    bufs = [torch.full((n,), float("nan")), x0.clone(), acc.clone()]
    ops.rk_stage(bufs[0], g, bufs[1], bufs[2], coeffs, segs, reg_grad=reg, write_x0=True, backend=backend)
    out[backend] = bufs
for a, b in zip(out["csrc"], out["reference"]):
    assert not a.isnan().any() and torch.allclose(a, b, rtol=1e-6, atol=1e-6), (a - b).abs().max()
ts = [torch.randn(70000, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)]
got, want = ops.sqnorm(ts, backend="csrc"), ops.sqnorm(ts, backend="reference")
assert torch.allclose(got, want, rtol=1e-12), (got, want)
assert ops.why_unavailable("csrc") is None and ops.resolve("auto", torch.device("cpu"), "stage") == "csrc"
assert csrc.status()["loaded"].startswith(os.environ["TORCH_EXTENSIONS_DIR"]), csrc.status()
print("rk_stage and sqnorm: csrc == reference; library", csrc.status()["loaded"])
EOF

step "odegan train dirac --steps 200"
"$work/venv/bin/odegan" train dirac --steps 200 --out "$work/run" --no-progress > "$work/train.log" 2>&1 ||
  { tail -40 "$work/train.log"; exit 1; }
tail -3 "$work/train.log"
ls "$work/run"

step "wheel smoke test passed"
