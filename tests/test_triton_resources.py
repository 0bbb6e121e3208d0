"""Every GEMM-shaped Triton kernel fits the shared memory of the GPUs it is meant for.

Triton multi-buffers the loads of a GEMM loop, so a tile choice that runs in the CPU interpreter can
need more shared memory than a GPU has (the first H100 run: the grad-input kernel with the BN fold
asked for 364 KiB, the limit is 227 KiB). The kernels are compiled here for sm_90 and sm_86 without
a GPU (Triton's own ptxas) and the shared memory they ask for is compared with each chip's limit.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from madfast.ops.upsample_conv import triton_kernel as K  # noqa: E402

# shared memory per block (bytes) an opt-in kernel may use: H100 and A10/RTX 30xx
LIMITS = {90: 232448, 86: 101376}
PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _shared(fn, types: dict[str, str], constexprs: dict, arch: int, **options) -> int:
    params = list(inspect.signature(fn.fn).parameters)
    sig = {p: "constexpr" if p in constexprs else types.get(p, "i32") for p in params}
    src = ASTSource(fn, sig, {(params.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).metadata.shared


def _common(dtype):
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    dot = "tf32" if dtype == torch.float32 else "ieee"
    return acc, dot, dtype in (torch.float16, torch.bfloat16)


def _grad_input(dtype, arch, cfg) -> int:
    acc, dot, _ = _common(dtype)
    p = PTR[dtype]
    types = {"gy_ptr": p, "y_ptr": p, "w_ptr": p, "gx_ptr": p, "gsum_ptr": "*fp32", "gsumsq_ptr": "*fp32",
             "mean_ptr": "*fp32", "scale_h": "fp32", "scale_w": "fp32"}
    consts = dict(FOLD_SUM=True, FOLD_SUMSQ=True, CENTRED=True, FP32_DOT=dot, ACC=acc, TILE_H=K.TILE_H,
                  TILE_W=K.TILE_W, REGION=K.REGION, REGION_W=2 * K.TILE_W + 4, BLOCK_CI=cfg["block_ci"],
                  BLOCK_K=cfg["block_k"])
    return _shared(K._upsample_conv_grad_input_kernel, types, consts, arch, num_stages=cfg["num_stages"])


def _forward_and_grad_weight(dtype) -> list[int]:
    acc, dot, lowp = _common(dtype)
    p = PTR[dtype]
    fl = {"scale_h": "fp32", "scale_w": "fp32"}
    fwd = _shared(K._upsample_conv_fwd_kernel, dict(fl, x_ptr=p, w_ptr=p, y_ptr=p, mean_ptr="*fp64", m2_ptr="*fp64"),
                  dict(STATS=True, LOWP=lowp, FP32_DOT=dot, ACC=acc, BLOCK_M=64, BLOCK_N=32, BLOCK_K=32), 90)
    gw_types = dict(fl, x_ptr=p, gy_ptr=p, y_ptr=p, gsum_ptr="*fp32", gsumsq_ptr="*fp32", mean_ptr="*fp32",
                    gw_ptr="*fp64" if dtype == torch.float64 else "*fp32")
    gw = _shared(K._upsample_conv_grad_weight_kernel, gw_types,
                 dict(FOLD_SUM=True, FOLD_SUMSQ=True, CENTRED=True, LOWP=lowp, FP32_DOT=dot, ACC=acc,
                      BLOCK_M=32, BLOCK_N=32, BLOCK_K=32), 90)
    return [fwd, gw]


def _moments(dtype) -> list[int]:
    """The BN-moments kernels (split reduction included): reductions, not GEMMs, but compiling them
    for sm_90 here catches what the interpreter accepts and the compiler does not."""
    from madfast.ops.bn_stats import triton_kernel as B

    acc = tl.float64 if dtype == torch.float64 else tl.float32
    p, a = PTR[dtype], PTR[torch.float64 if dtype == torch.float64 else torch.float32]
    wide = {"s_n": "i64", "s_c": "i64"}
    return [_shared(B._moments_nchw_kernel, dict(wide, x_ptr=p, mean_ptr=a, var_ptr=a),
                    dict(ACC=acc, BLOCK=B.BLOCK), 90),
            _shared(B._partials_nchw_kernel, dict(wide, x_ptr=p, part_ptr=a), dict(ACC=acc, BLOCK=B.BLOCK), 90),
            _shared(B._partials_cl_kernel, dict(x_ptr=p, part_ptr=a),
                    dict(ACC=acc, BLOCK_P=B.BLOCK_P, BLOCK_C=B.BLOCK_C), 90),
            _shared(B._merge_partials_kernel, dict(part_ptr=a, mean_ptr=a, var_ptr=a), dict(ACC=acc, BLOCK_C=B.BLOCK_C),
                    90)]


def _measure() -> dict[str, int]:
    """Shared memory (bytes) of every case, keyed "kernel/dtype/arch"; "before" is the grad-input
    kernel's tiles before the fix (3 stages, BLOCK_K=32), which must measure over the H100's limit."""
    out = {"before": _grad_input(torch.float32, 90, {"block_ci": 32, "block_k": 32, "num_stages": 3})}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for name, smem in zip(("moments", "moment_partials", "moment_partials_cl", "moment_merge"), _moments(dtype)):
            out[f"{name}/{dtype}/90"] = smem
    for dtype in DTYPES:
        for arch, limit in LIMITS.items():
            out[f"grad_input/{dtype}/{arch}"] = _grad_input(dtype, arch, K.grad_input_config(dtype, limit))
        out[f"forward/{dtype}/90"], out[f"grad_weight/{dtype}/90"] = _forward_and_grad_weight(dtype)
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


CASES = ([f"grad_input/{d}/{a}" for d in DTYPES for a in LIMITS]
         + [f"{k}/{d}/90" for k in ("forward", "grad_weight") for d in DTYPES])
MOMENT_CASES = [f"{k}/{d}/90" for k in ("moments", "moment_partials", "moment_partials_cl", "moment_merge")
                for d in (torch.float32, torch.bfloat16, torch.float64)]


@pytest.mark.parametrize("key", CASES)
def test_kernel_fits_shared_memory(shared, key):
    limit = LIMITS[int(key.rsplit("/", 1)[1])]
    assert 0 < shared[key] <= limit, f"{key}: {shared[key]} B of shared memory > {limit}"


@pytest.mark.parametrize("key", MOMENT_CASES)
def test_moment_kernels_compile_for_sm90(shared, key):
    assert 0 <= shared[key] <= LIMITS[90], f"{key}: {shared[key]} B of shared memory"
