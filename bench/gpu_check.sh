#!/usr/bin/env bash
# The GPU check, one command, well under 10 minutes on an H100: build csrc with its CUDA kernels, run the
# whole test suite on the GPU (Triton for real, the GPU-marked tests included), the kernel benchmark and
# the step benchmark, then print a short table. At most 7 files land in the results folder (the device
# tool returns 8): gpu_check.log and the two benchmarks' csv/md/png.
#
#   bash bench/gpu_check.sh [all|tests|bench|imagenet]   # results into bench/results/gpu_<date>/ (or $OUT)
#
# 'all' (the default) does everything; if one device call cannot hold it (10 minutes there), run 'tests'
# and 'bench' as two calls: each builds csrc first (the build is not kept between machines). 'imagenet'
# (not part of 'all') times the step of the class-conditional 128x128 ResNet at batch 32 (step128_cuda.*).
set -uo pipefail
export PYTHONUNBUFFERED=1  # a run stopped at the device's limit keeps what it printed (the log is tee'd)
PART=${1:-all}
case "$PART" in all|tests|bench|imagenet) ;; *) echo "usage: bash bench/gpu_check.sh [all|tests|bench|imagenet]"; exit 2;; esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%d-%H%M)
DEST=${OUT:-bench/results/gpu_$STAMP}
mkdir -p "$DEST"
exec > >(tee "$DEST/gpu_check.log") 2>&1
status=0

echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || status=1
$PY - <<'PYEOF'
import torch, triton, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "device", torch.cuda.get_device_name(0))
PYEOF
# Best effort: tests and benchmarks import the package from this source tree anyway (no registry there;
# --no-build-isolation needs setuptools and wheel in the image).
$PY -m pip install -q -e . --no-deps --no-build-isolation > /dev/null 2>&1 || echo "(editable install skipped: using the source tree)"

echo "== build csrc (CMake, CUDA sm_80/sm_90)"
t0=$(date +%s)
PYTHON=$PY bash csrc/build.sh --cuda > /tmp/odegan_build.log 2>&1 || { echo "csrc build FAILED"; tail -40 /tmp/odegan_build.log; status=1; }
echo "build: $(( $(date +%s) - t0 )) s"

if [ "$PART" = imagenet ]; then
echo "== step benchmark: conditional ResNet at 128x128"
ODEGAN_CSRC_LIB=$PWD/build-csrc/libodegan_kernels_csrc.so \
  $PY -m bench.step --device cuda --models resnet128 --dcgan-batch 32 --out "$DEST/step128_cuda.csv" 2>&1 || status=1
tail -12 "$DEST/step128_cuda.md" 2>/dev/null
echo "results in $DEST (status $status)"
exit $status
fi

if [ "$PART" != bench ]; then
echo "== tests on the GPU"
t0=$(date +%s)
ODEGAN_SKIP_CSRC_BUILD=1 ODEGAN_CSRC_LIB=$PWD/build-csrc/libodegan_kernels_csrc.so \
  timeout "${TESTS_LIMIT:-420}" $PY -m pytest -q -rfEs -p no:cacheprovider -m "not slow" tests 2>&1 || status=1
echo "tests: $(( $(date +%s) - t0 )) s"
fi

if [ "$PART" != tests ]; then

# Each benchmark writes its files after every size / model, so one cut by its time limit keeps the rest.
echo "== kernel benchmark"
ODEGAN_CSRC_LIB=$PWD/build-csrc/libodegan_kernels_csrc.so \
  timeout "${KERNELS_LIMIT:-220}" $PY -m bench.kernels --device cuda --out "$DEST/kernels_cuda.csv" 2>&1 |
  tee /tmp/odegan_kernels.log || status=1

echo "== step benchmark"
ODEGAN_CSRC_LIB=$PWD/build-csrc/libodegan_kernels_csrc.so \
  timeout "${STEP_LIMIT:-250}" $PY -m bench.step --device cuda --out "$DEST/step_cuda.csv" 2>&1 || status=1

fi

echo "== summary"
[ -f /tmp/odegan_kernels.log ] && grep -E "^(stage|rk4|sqnorm|copy) " /tmp/odegan_kernels.log |
  grep -E "P= *(1,000,000|8,388,608|100,000,000|1,000,000,000)"
tail -12 "$DEST/step_cuda.md" 2>/dev/null
grep -A12 "^## Ratios" "$DEST/kernels_cuda.md" 2>/dev/null
echo "results in $DEST (status $status)"
exit $status
