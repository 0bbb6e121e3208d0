#!/usr/bin/env bash
# The prepared GPU run (`make gpu-check OUT=DIR`), for a bare GPU machine with Python, torch, triton,
# nvcc, pytest and pytest-benchmark but no package registries. Steps in order of value per second,
# each writing into DIR as it goes (8 files at most, all that a lent machine returns):
#   1. build.log              the extension, built for this GPU's architecture only, with every core
#   2. step.log, step.json    madfast bench step, both cases of bench_mad_step (CIFAR ResNet-34 → ResNet-18
#                             at batch 256, then ResNet-50 → ResNet-18 at 224 px, batch 64): the whole MAD
#                             iteration for eager fp32, madfast's default and the default compiled
#   3. headline.json          madfast check --headline: each op's MAD shapes in fp32 and bf16, checked,
#                             then timed against torch, eager and torch.compile
#      verified-entries.json  what step 3 verifies for 'auto' (commit into madfast/verified.json);
#                             nothing after step 3 is needed for it
#   4. check.json             madfast check --no-timing: every shape and dtype, correctness only
#      check.log              the console of steps 3 and 4
#   5. pytest.log             the test suite on the GPU (Triton compiled, CUDA kernels live)
# Each step has a time limit (BUILD_S, STEP_S per case, HEADLINE_S, CHECK_S, TEST_S), cut to what is left
# of TOTAL_S, the whole run's (set it to the device call's timeout less 20 s). What a step compiles
# (the Triton kernels: benchmarks/triton_compiles.py counts them on a CPU) is most of its first-run time.
# What runs can be narrowed (benchmarks/gpu_recheck.sh does, to rerun only what failed or was cut short):
# STEP_CASES, HEADLINE_OPS, CHECK_OPS (comma-separated; "all" by default) and TESTS (pytest node ids); an
# empty one skips its step. DEVICE=cpu rehearses the whole script on a CPU (--quick checks, the Triton
# interpreter). `--dry-run` prints the steps. Exit status: 0 when every step that ran passed;
# else the first failure's.
set -uo pipefail

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUT_DIR}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
quick=$([ "$DEVICE" = cpu ] && echo --quick)
STEP_PROVIDERS=${STEP_PROVIDERS:-eager,default,default_compile}  # a second call: default_cudagraphs
STEP_CASES=${STEP_CASES-r34_r18_32px_b256,r50_r18_224px_b64}
HEADLINE_OPS=${HEADLINE_OPS-all} HEADLINE_DTYPES=${HEADLINE_DTYPES:-float32,bfloat16} CHECK_OPS=${CHECK_OPS-all}
BUILD_S=${BUILD_S:-75} STEP_S=${STEP_S:-110} HEADLINE_S=${HEADLINE_S:-150} CHECK_S=${CHECK_S:-150}
TEST_S=${TEST_S:-150} TOTAL_S=${TOTAL_S:-540}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1
if [ "$DEVICE" = cpu ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi  # Triton compiles for the GPU
export TRITON_PRINT_AUTOTUNING=1  # the logs record which tile the block's autotuner picked per shape

status=0
limit() {  # limit SECONDS: SECONDS, or what is left of TOTAL_S when that is less
  local left=$((TOTAL_S - SECONDS))
  echo $(($1 < left ? $1 : left))
}
step() {  # step NAME SECONDS LOG COMMAND...: COMMAND under its time limit (or what is left), output into LOG
  local name=$1 secs left=$((TOTAL_S - SECONDS)) log=$3
  secs=$(limit "$2"); shift 3
  echo "== $(date -u +%H:%M:%S) $name (limit ${secs}s) → $log: $*"
  if [ $dry = 1 ]; then return 0; fi
  if [ "$secs" -lt 10 ]; then echo "== $name: skipped, ${left}s of TOTAL_S left" | tee -a "$log"; return 0; fi
  local t0=$SECONDS rc
  timeout --kill-after=10 "$secs" "$@" >>"$log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$log"
  tail -n 5 "$log"
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
  return $rc
}
ops() {  # ops LIST: the check's --ops flag for LIST ("all": none)
  [ "$1" = all ] || echo "--ops $1"
}
keep() {  # keep FROM TO: a step's file under its final name (nothing when the step wrote none)
  [ $dry = 1 ] || { [ -f "$1" ] && mv "$1" "$2"; }
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

# 1. The extension for this GPU only (one architecture, all cores).
# (An in-place build if pip may not install here, e.g. an externally managed Python.)
TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) MADFAST_CUDA=1 \
  step build "$BUILD_S" "$out/build.log" bash -c "$PYTHON -m pip install --no-deps --no-build-isolation -e . \
  || $PYTHON setup.py build_ext --inplace"

# 2. The whole iteration per case (the compiled provider's compile is most of it); step.json maps
#    each finished case to its results.
[ -n "$STEP_CASES" ] && [ $dry = 0 ] && echo "# step cases: ${STEP_CASES//,/ }" >>"$out/step.log"
for case in ${STEP_CASES//,/ }; do
  step "step $case" "$STEP_S" "$out/step.log" $PYTHON -m madfast bench step --case "$case" --device $DEVICE \
    --providers "$STEP_PROVIDERS" --rounds 10 --out "$out/step-tmp"
  [ $dry = 1 ] || $PYTHON -c 'import glob, json, os, sys
path, case = sys.argv[1:]
merged = json.load(open(path)) if os.path.exists(path) else {}
for f in glob.glob(os.path.join(os.path.dirname(path), "step-tmp", "step-*.json")):
    merged[case] = json.load(open(f))
json.dump(merged, open(path, "w"), indent=1)' "$out/step.json" "$case"
  rm -rf "$out/step-tmp"
done

# 3. The headline shapes, checked and timed: the verified entries.
if [ -n "$HEADLINE_OPS" ]; then
  budget=$(($(limit "$HEADLINE_S") - 20))  # timing stops in time to write what it measured
  step headline "$HEADLINE_S" "$out/check.log" $PYTHON -m madfast check --device $DEVICE $quick --headline $(ops "$HEADLINE_OPS") \
    --dtypes "$HEADLINE_DTYPES" --out "$out/headline" --no-progress --time-budget $((budget > 5 ? budget : 5))
  keep "$out/headline/check.json" "$out/headline.json"
  keep "$out/headline/verified-entries.json" "$out/verified-entries.json"
  rm -rf "$out/headline"
fi

# 4. Every shape and dtype, correctness only.
if [ -n "$CHECK_OPS" ]; then
  step check "$CHECK_S" "$out/check.log" $PYTHON -m madfast check --device $DEVICE $quick --no-timing $(ops "$CHECK_OPS") \
    --out "$out/full" --no-progress
  keep "$out/full/check.json" "$out/check.json"
  rm -rf "$out/full"
fi

# 5. The test suite on the GPU: the kernel tests first, then the rest; not the CPU-only rehearsals
#    (emulator, CMake, compile-for-sm_90 resource, instruction-mix and fp64 checks) or the slow trainer runs.
kernel_tests="tests/test_upsample_conv.py tests/test_upsample_block.py tests/test_losses.py tests/test_ema_op.py
  tests/test_fused_ema.py tests/test_loss_modules.py tests/test_generator.py tests/test_build.py"
other_tests=$(ls tests/test_*.py | grep -v -e test_cuda_emulated -e test_cmake -e test_triton_resources -e test_kernel_sass -e test_fp64_instructions $(printf ' -e %s' $kernel_tests))
TESTS=${TESTS-$(echo $kernel_tests $other_tests)}
# -v: one line per test as it ends, so a run cut by its time limit still names every failure so far.
[ -n "$TESTS" ] && [ $dry = 0 ] && echo "# tests: $TESTS" >>"$out/pytest.log"
[ -n "$TESTS" ] && step tests "$TEST_S" "$out/pytest.log" $PYTHON -m pytest $TESTS -v --tb=short -ra -p no:cacheprovider \
  -m "not slow" --durations=10

echo "== $(date -u +%H:%M:%S) gpu-check done (status $status): $(ls "$out" | tr '\n' ' ')"
exit $status
