#!/usr/bin/env bash
# The prepared GPU run (`make gpu-check OUT=DIR`), for a bare GPU machine with Python, torch, triton,
# nvcc, pytest and pytest-benchmark but no package registries. In order of value, each step's output
# written to DIR as it goes (8 files at most, so that all of them come back from a lent machine):
#   1. build.log              the extension, built for this GPU's architecture only, with every core
#   2. step.{log,json}        madfast bench step: one whole MAD iteration (CIFAR ResNet-34 → ResNet-18,
#                             batch 256) for the eager fp32 reference, madfast's default and the default
#                             compiled, by phase, op kind and network: the whole-iteration ratio first
#   3. check.{log,json,md}    madfast check --device cuda: every kernel verified, then timed
#      verified-entries.json  what that run verifies for 'auto' (commit into madfast/verified.json)
#   4. pytest.log             the test suite on the GPU (Triton compiled, CUDA kernels live)
#   5. bench.{log,json}       the benchmark suites, short (only with BENCH_S > 0: then 10 files, and
#                             a lent machine returns 8 — drop check.md and verified-entries.json)
# Each step has a time limit (seconds, overridable: BUILD_S, STEP_S, CHECK_S, TEST_S, BENCH_S); the defaults
# add up to 10 minutes, one device call (first H100 run: build 48 s; the check's correctness pass needs
# ~130 s per dtype, most of it Triton compiling each shape, so the check covers fp32 — CHECK_DTYPES, add
# bfloat16 with CHECK_S=380 — and leaves the rest of its time to timing, which verified dispatch needs;
# the tests cover bf16/fp16/fp64; the benchmark suites run only with BENCH_S > 0). `--dry-run` prints the steps without running them.
# Exit status: 0 when the build, the check and the tests passed; else the first failing step's.
set -uo pipefail

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUT_DIR}
PYTHON=${PYTHON:-python3}
STEP_PROVIDERS=${STEP_PROVIDERS:-eager,default,default_compile}  # a second call: default_cudagraphs
BUILD_S=${BUILD_S:-120} STEP_S=${STEP_S:-150} CHECK_S=${CHECK_S:-240} TEST_S=${TEST_S:-90} BENCH_S=${BENCH_S:-0}
CHECK_DTYPES=${CHECK_DTYPES:-float32}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # Triton compiles for the GPU here
export TRITON_PRINT_AUTOTUNING=1  # the logs record which tile the block's autotuner picked per shape

status=0
step() {  # step NAME SECONDS LOG COMMAND...: runs COMMAND under a time limit, its output into LOG
  local name=$1 secs=$2 log=$3; shift 3
  echo "== $(date -u +%H:%M:%S) $name (limit ${secs}s) → $log: $*"
  if [ $dry = 1 ]; then return 0; fi
  local t0=$SECONDS rc
  timeout --kill-after=10 "$secs" "$@" >>"$log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$log"
  tail -n 5 "$log"
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
  return $rc
}

arch=$($PYTHON -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "9.0")
{
  echo "# madfast gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>&1 || true
  $PYTHON -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  $PYTHON -c 'import triton; print("triton", triton.__version__)' 2>&1 || true
  nvcc --version 2>&1 | tail -n 2 || true
  echo "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc)"
} >"$out/build.log" 2>&1
[ $dry = 1 ] && cat "$out/build.log"

# 1. The extension for this GPU only (one architecture, all cores): a few minutes at most.
# (An in-place build if pip may not install here, e.g. an externally managed Python.)
TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) MADFAST_CUDA=1 \
  step build "$BUILD_S" "$out/build.log" bash -c "$PYTHON -m pip install --no-deps --no-build-isolation -e . \
  || $PYTHON setup.py build_ext --inplace"

# 2. The whole iteration, eager / default / compiled (the compile takes most of this step's time).
step step "$STEP_S" "$out/step.log" $PYTHON -m madfast bench step --device cuda --providers "$STEP_PROVIDERS" \
  --rounds 10 --out "$out/step-tmp"
if [ $dry = 0 ]; then mv "$out"/step-tmp/step-*.json "$out/step.json" 2>/dev/null; rm -rf "$out/step-tmp"; fi

# 3. Every kernel checked (values and gradients, all dtypes), then timed until CHECK_S is nearly spent.
step check "$CHECK_S" "$out/check.log" $PYTHON -m madfast check --device cuda --dtypes "$CHECK_DTYPES" --out "$out" --no-progress \
  --time-budget $((CHECK_S - 40))

# 4. The test suite on the GPU: the kernel tests first, then the rest; not the CPU-only rehearsals
#    (emulator, CMake, compile-for-sm_90 resource, instruction-mix and fp64 checks) or the slow trainer runs.
kernel_tests="tests/test_upsample_conv.py tests/test_upsample_block.py tests/test_losses.py tests/test_ema_op.py
  tests/test_fused_ema.py tests/test_loss_modules.py tests/test_generator.py tests/test_build.py"
other_tests=$(ls tests/test_*.py | grep -v -e test_cuda_emulated -e test_cmake -e test_triton_resources -e test_kernel_sass -e test_fp64_instructions $(printf ' -e %s' $kernel_tests))
# -v: one line per test as it ends, so a run cut by its time limit still names every failure so far.
step tests "$TEST_S" "$out/pytest.log" $PYTHON -m pytest $kernel_tests $other_tests -v --tb=short -ra -p no:cacheprovider \
  -m "not slow" --durations=10

# 5. The benchmarks, few rounds each (BENCH_S > 0).
[ "$BENCH_S" -gt 0 ] && MADFAST_BENCH_ROUNDS=5 step bench "$BENCH_S" "$out/bench.log" $PYTHON -m pytest benchmarks -q -p no:cacheprovider \
  -o python_files='bench_*.py' -o testpaths= --benchmark-json="$out/bench.json" \
  --benchmark-columns=mean,rounds || true  # speed is measured, not asserted

echo "== $(date -u +%H:%M:%S) gpu-check done (status $status): $(ls "$out" | tr '\n' ' ')"
exit $status
