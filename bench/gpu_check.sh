#!/usr/bin/env bash
# The GPU check in two parts sized for a session's device time (bench/gpu_check.py has the checks; the time
# estimate is in bench/EXPECTATIONS.md):
#
#   bash bench/gpu_check.sh quick [--dry-run]   # each never-run path once + a reduced benchmark: <= 4 min on an H200
#   bash bench/gpu_check.sh full  [--dry-run]   # the rest (all sizes, the ResNets, NCCL): <= 8 min; after quick passes
#
# Results go to $OUT (the device tool's folder) or bench/results/gpu_<part>_<date>/: at most 7 files, written as the
# checks go (the log, checks_<part>.jsonl, the benchmarks' csv and md). --dry-run lists every check and runs its CPU
# fallback at small sizes, on any machine (CI: tests/test_gpu_check.py). PYTHON picks the interpreter (python3).
set -uo pipefail
export PYTHONUNBUFFERED=1  # a run stopped at the device's limit keeps what it printed
cd "$(dirname "$0")/.."
PART=${1:-}
case "$PART" in quick|full) ;; *) echo "usage: bash bench/gpu_check.sh quick|full [--dry-run]" >&2; exit 2;; esac
shift
PY=${PYTHON:-python3}
export OUT=${OUT:-bench/results/gpu_${PART}_$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
"$PY" -m bench.gpu_check "$PART" "$@" 2>&1 | tee "$OUT/gpu_check_$PART.log"
exit "${PIPESTATUS[0]}"
