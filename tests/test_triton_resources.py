"""Every GEMM-shaped Triton kernel fits the shared memory of the GPUs it is meant for.

Triton multi-buffers the loads of a GEMM loop, so a tile choice that runs in the CPU interpreter can
need more shared memory than a GPU has (the first H100 run: the grad-input kernel with the BN fold
asked for 364 KiB, the limit is 227 KiB). The kernels are compiled here for sm_90 and sm_86 without
a GPU (Triton's own ptxas) and the shared memory they ask for is compared with each chip's limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
from madfast.ops.upsample_conv import triton_kernel as K  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from kernel_sass import block_kernel, compile_for_gpu, triton_kernels  # noqa: E402

# shared memory per block (bytes) an opt-in kernel may use: H100 and A10/RTX 30xx
LIMITS = {90: 232448, 86: 101376}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _shared(fn, types: dict[str, str], constexprs: dict, arch: int, **options) -> int:
    return compile_for_gpu(fn, types, constexprs, arch, **options).metadata.shared


def _block(kernel, dtype, arch, cfg) -> int:
    """Shared memory of one of the block's GEMM kernels, compiled as the host launches it."""
    fn, types, consts, options = block_kernel(kernel, dtype, cfg)
    return _shared(fn, types, consts, arch, **options)


MOMENT_KERNELS = ("moment_partials_nchw", "moment_partials_cl", "bn_grad_nchw", "bn_grad_cl", "moment_finalize",
                  "moment_finalize_norms")


def _moments(dtype) -> dict[str, int]:
    """The BN-moments kernels, three layers per launch (tuples of pointers): reductions, not GEMMs,
    but compiling them for sm_90 here catches what the interpreter accepts and the compiler does not."""
    kernels = triton_kernels(dtype)
    return {name: _shared(*kernels[name][:3], 90, **kernels[name][3]) for name in MOMENT_KERNELS}


def _measure() -> dict[str, int]:
    """Shared memory (bytes) of every case, keyed "kernel/dtype/arch[/which]"; "before" is the
    grad-input kernel's tiles before the fix (3 stages, BLOCK_K=32), which must measure over the
    H100's limit. Every tile the host picks is compiled for both chips; every config the forward's
    autotuner may try on sm_90 (where it skips one that does not fit, its first must fit)."""
    out = {"before": _block("grad_input", torch.float32, 90, {"block_ci": 32, "block_k": 32, "num_stages": 3})}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for name, smem in _moments(dtype).items():
            out[f"{name}/{dtype}/90"] = smem
    for dtype in DTYPES:
        for arch, limit in LIMITS.items():
            for c in CHANNELS:
                out[f"grad_input/{dtype}/{arch}/{c}"] = _block("grad_input", dtype, arch,
                                                               K.grad_input_config(dtype, limit, c))
                out[f"grad_weight/{dtype}/{arch}/{c}"] = _block("grad_weight", dtype, arch,
                                                                K.grad_weight_config(dtype, limit, c, c))
            configs = K.forward_configs(dtype)
            out[f"forward/{dtype}/{arch}/first"] = _block("forward", dtype, arch, configs[0])
        if dtype in (torch.float32, torch.bfloat16):
            out[f"forward/{dtype}/90/tuned"] = max(_block("forward", dtype, 90, c) for c in configs[1:])
    return out


@pytest.fixture(scope="module")
def shared() -> dict[str, int]:
    # Compiled in a child without TRITON_INTERPRET (the suite's interpreter makes @triton.jit uncompilable).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json, test_triton_resources as t; print(json.dumps(t._measure()))"
    run = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_check_can_fail(shared):
    assert shared["before"] > LIMITS[90]


CHANNELS = (16, 64, 128)  # input = output channels of the layer the backward tiles are picked for
CASES = ([f"{k}/{d}/{a}/{c}" for k in ("grad_input", "grad_weight") for d in DTYPES for a in LIMITS for c in CHANNELS]
         + [f"forward/{d}/{a}/first" for d in DTYPES for a in LIMITS])
MOMENT_CASES = [f"{k}/{d}/90" for k in MOMENT_KERNELS for d in (torch.float32, torch.bfloat16, torch.float64)]


@pytest.mark.parametrize("key", CASES)
def test_kernel_fits_shared_memory(shared, key):
    limit = LIMITS[int(key.split("/")[2])]
    assert 0 < shared[key] <= limit, f"{key}: {shared[key]} B of shared memory > {limit}"


@pytest.mark.parametrize("key", MOMENT_CASES)
def test_moment_kernels_compile_for_sm90(shared, key):
    assert 0 <= shared[key] <= LIMITS[90], f"{key}: {shared[key]} B of shared memory"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_autotune_configs_fit_the_h100(shared, dtype):
    assert 0 < shared[f"forward/{dtype}/90/tuned"] <= LIMITS[90]
