"""The generator block's GEMM loops can feed the tensor cores: compiled for sm_90 here (no GPU),
disassembled, and each hottest loop's instruction issue time compared with its tensor-core time
(benchmarks/kernel_sass.py). The limits are what the halo forward (1.5×) and the tap-major
gradients (5.1×, 2.6×) reach with the tiles the host picks, with room for compiler drift; a
tap-major forward measured 3.3×, the kernels before 10.6× (forward, same tile), 24× (weight
gradient) and no tensor-core instruction at all (bf16 input gradient)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = {"forward": 2.0, "grad_weight": 7.0, "grad_input": 4.0}  # bf16, best tile of each kernel


@pytest.fixture(scope="module")
def loops() -> list[dict]:
    # compiled in a child without TRITON_INTERPRET (under the interpreter @triton.jit cannot compile)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, kernel_sass as k; print(json.dumps([dict(kernel=r.kernel, dtype=r.dtype, mma=r.mix.mma, "
            "ratio=r.issue_over_tensor) for r in k.block_kernel_loops()]))")
    run = subprocess.run([sys.executable, "-c", code], cwd=os.path.join(ROOT, "benchmarks"), env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", sorted(LIMITS))
def test_loop_issue_time_near_tensor_core_time(loops, kernel):
    best = min(r["ratio"] for r in loops if r["kernel"] == kernel and r["dtype"] == "bf16")
    assert best <= LIMITS[kernel], f"{kernel}: the loop issues {best:.1f}× its bf16 tensor-core time"


def test_every_loop_runs_on_tensor_cores(loops):
    assert {(r["kernel"], r["dtype"]) for r in loops if r["mma"] == 0} == set()
    assert {r["kernel"] for r in loops} == set(LIMITS)
