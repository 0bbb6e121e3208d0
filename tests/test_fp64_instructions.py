"""fp64 arithmetic only for fp64 inputs, checked on the compiled code.

An H100 runs fp64 at half its fp32 rate, L4/A10/RTX cards at 1/32–1/64: a kernel that accumulates
bf16 or fp32 data in fp64 is fine on the first and slow on the others. Every Triton kernel is
compiled here for sm_90 (Triton's own toolchain, no GPU) as its host code launches it, and every
CUDA kernel of the built extension is disassembled (cuobjdump); the fp64 arithmetic instructions
(DADD, DMUL, DFMA, DSETP, …) of each kernel compiled for fp32/bf16/fp16 data are counted. The only
ones allowed are EMA's: 1 − decay is kept in fp64, one scalar per program or
thread. The fp64 instantiations are counted too, so that a counter that sees nothing fails.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
ALLOWED = {"ema": 1}  # one comparison / subtraction of the fp64 weight per program (Triton) or thread (CUDA)
DTYPES = ("float32", "bfloat16", "float64")  # fp16 compiles as bf16 does (same code, other type)


def _count_triton() -> dict[str, int]:
    """fp64 instructions per Triton kernel, keyed "name/dtype" (run in a child: see triton_counts)."""
    import torch

    import kernel_sass as k

    out = {}
    for name in DTYPES:
        dtype = getattr(torch, name)
        for kernel, (fn, types, consts, options) in k.triton_kernels(dtype).items():
            out[f"{kernel}/{name}"] = k.fp64_instructions(k.compile_sass(fn, types, consts, **options))
    return out


@pytest.fixture(scope="module")
def triton_counts() -> dict[str, int]:
    pytest.importorskip("triton")
    # compiled in a child without TRITON_INTERPRET (under the interpreter @triton.jit cannot compile)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json, test_fp64_instructions as t; print(json.dumps(t._count_triton()))"
    run = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                         env=dict(env, PYTHONPATH=os.pathsep.join([BENCH, env.get("PYTHONPATH", "")])),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_triton_kernels_use_fp64_only_for_fp64(triton_counts):
    over = {key: n for key, n in triton_counts.items()
            if not key.endswith("/float64") and n > ALLOWED.get(key.split("/")[0], 0)}
    assert over == {}, f"fp64 arithmetic in kernels for non-fp64 inputs: {over}"


def test_triton_counter_sees_fp64(triton_counts):
    """The fp64 instantiations do their arithmetic in fp64: the counter can tell (so the test above can fail)."""
    kernels = {key.split("/")[0] for key in triton_counts}
    assert {key for key, n in triton_counts.items() if key.endswith("/float64") and n == 0} == set()
    assert len(kernels) >= 19 and {"block_forward", "kl_fwd", "ema", "moment_partials_cl"} <= kernels


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def _cuda_kernels() -> dict[str, tuple[str, int]]:
    """sm_90 kernels of the built extension: mangled name → (demangled name, fp64 instructions)."""
    sys.path.insert(0, BENCH)
    from kernel_sass import fp64_instructions

    libs = glob.glob(os.path.join(ROOT, "madfast", "_C*.so"))
    tool = _cuobjdump()
    if not libs or tool is None:
        pytest.skip("needs the built extension and cuobjdump (CUDA toolkit or Triton's copy)")
    listed = subprocess.run([tool, "-lelf", libs[0]], capture_output=True, text=True)
    if "sm_90" not in listed.stdout:
        pytest.skip("the extension was built without sm_90 CUDA kernels (MADFAST_CUDA=0 or another arch)")
    sass = subprocess.run([tool, "-sass", "-arch", "sm_90", libs[0]], capture_output=True, text=True,
                          check=True, timeout=600).stdout
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    names = [f.split("\n", 1)[0].strip() for f in functions]
    filt = shutil.which("c++filt")
    if filt is None:
        pytest.skip("needs c++filt (binutils) to read the kernels' template arguments")
    demangled = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return {name: (pretty, fp64_instructions(body)) for name, pretty, body in zip(names, demangled, functions)}


@pytest.fixture(scope="module")
def cuda_kernels() -> dict[str, tuple[str, int]]:
    return _cuda_kernels()


def _template_args(pretty: str) -> list[str]:
    """``void ns::kernel<float, c10::BFloat16, 4>(...)`` → ["float", "c10::BFloat16", "4"]."""
    head = pretty.split("(", 1)[0]
    return [a.strip() for a in head[head.find("<") + 1:head.rfind(">")].split(",")] if "<" in head else []


def test_cuda_kernels_use_fp64_only_for_fp64(cuda_kernels):
    """A kernel instantiated without double (data and accumulation below fp64) has no fp64
    arithmetic; the BN kernels accumulate a call in fp64 only when one of its layers is fp64."""
    over = {pretty: n for pretty, n in cuda_kernels.values()
            if "double" not in _template_args(pretty) and n > (ALLOWED["ema"] if "::ema" in pretty else 0)}
    assert over == {}, f"fp64 arithmetic in CUDA kernels for non-fp64 data: {over}"


def test_cuda_counter_sees_fp64(cuda_kernels):
    """Every kernel instantiated for fp64 data and accumulation alone does fp64 arithmetic."""
    fp64_only = {pretty: n for pretty, n in cuda_kernels.values()
                 if "double" in _template_args(pretty)
                 and not {"float", "c10::Half", "c10::BFloat16"} & set(_template_args(pretty))}
    assert len(cuda_kernels) >= 40 and len(fp64_only) >= 10
    assert {pretty for pretty, n in fp64_only.items() if n == 0} == set()
