#!/usr/bin/env bash
# A second, shorter GPU call after fixes (`bash benchmarks/gpu_recheck.sh OUT OPS [TEST FILES...]`): build,
# `madfast check` on the given ops only, then the given test files verbosely — each step under a time
# limit, so the whole call fits what is left of a session's device time.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_recheck.sh OUT_DIR OPS [TEST_FILES...]}; ops=${2:?ops}; shift 2
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
arch=$($PYTHON -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) MADFAST_CUDA=1 timeout "${BUILD_S:-120}" \
  $PYTHON -m pip install --no-deps --no-build-isolation -e . >"$out/build.log" 2>&1 || echo "build failed: $?"
timeout "${CHECK_S:-150}" $PYTHON -m madfast check --device cuda --ops "$ops" --out "$out" --no-progress \
  --time-budget $((${CHECK_S:-150} - 30)) >"$out/check.log" 2>&1
echo "check: exit $?"; grep -v " ok$" "$out/check.log" | head -40
if [ $# -gt 0 ]; then
  timeout "${TEST_S:-140}" $PYTHON -m pytest "$@" -v --tb=short -ra -p no:cacheprovider -m "not slow" >"$out/pytest.log" 2>&1
  echo "tests: exit $?"; grep -E "FAILED|ERROR|passed|failed" "$out/pytest.log" | tail -40
fi
