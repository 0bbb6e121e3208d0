#!/usr/bin/env bash
# The second GPU call (`bash benchmarks/gpu_recheck.sh [--dry-run] PREVIOUS_OUT OUT`): benchmarks/gpu_check.sh
# again, narrowed to what the previous run failed or did not reach (benchmarks/gpu_failures.py reads its
# files): the step cases without results, the check's ops with a failure or cut short, the failed tests
# and the test files it never reached. Time limits as in gpu_check.sh (set TOTAL_S to the call's).
set -euo pipefail
dry=()
if [ "${1:-}" = "--dry-run" ]; then dry=(--dry-run); shift; fi
usage="usage: benchmarks/gpu_recheck.sh [--dry-run] PREVIOUS_OUT_DIR OUT_DIR"
prev=${1:?$usage}; out=${2:?$usage}
cd "$(dirname "$0")/.."
todo=$(PYTHONPATH=. ${PYTHON:-python3} benchmarks/gpu_failures.py "$prev")
echo "$todo"
eval "$todo"
exec bash benchmarks/gpu_check.sh "${dry[@]}" "$out"
