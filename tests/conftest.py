import getpass
import os
import tempfile

import torch

# Inductor's on-disk cache is not keyed by ATEN_CPU_CAPABILITY: code compiled under one capability and
# loaded under another segfaulted (an AVX-512 cache run with ATEN_CPU_CAPABILITY=avx2). The suite is run
# under several capabilities to stand in for other CPUs, so each gets its own cache.
_capability = os.environ.get("ATEN_CPU_CAPABILITY")
if _capability:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{_capability}"))

# Without a GPU, Triton kernels run on CPU tensors in the interpreter; this must be set
# before triton.jit wraps the kernels, i.e. before madfast is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests check fp32 kernels against fp32/fp64 formulas, so on a GPU fp32 convolutions and matmuls
# run in fp32, not in TF32 (PyTorch's default for cuDNN; the Triton GEMMs follow the same flag).
# TF32 is a speed policy: `madfast check` verifies it with a TF32 floor (madfast.check.tolerances.floor).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

import pytest  # noqa: E402

import madfast  # noqa: E402,F401
from madfast import _backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_for(device: str) -> list[str]:
    """Every backend that should run on ``device``; the compiled ones are asserted present
    elsewhere (test_build.py), so a missing one here is a skip, not a silent pass."""
    names = ["torch", "triton", "cpp"] if device == "cpu" else ["torch", "triton", "cuda"]
    return names


# every compiled backend of every device here: (cpu, triton) under the interpreter, (cpu, cpp), and
# with a GPU (cuda, triton), (cuda, cuda)
COMPILED_BACKENDS = [(d, b) for d in DEVICES for b in backends_for(d) if b != "torch"]


def skip_unless_available(op: str, backend: str, device: str) -> None:
    try:
        _backend.choose(op, backend, torch.device(device))
    except _backend.BackendUnavailableError as e:
        pytest.skip(str(e))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# flash-attention's tolerance rule, the one `madfast check` applies (madfast.check.tolerances)
from madfast.check.tolerances import FLOORS, rel_err  # noqa: E402,F401


def assert_within(actual, expected, torch_same_dtype, dtype, factor, what):
    bound = max(factor * rel_err(torch_same_dtype, expected), FLOORS[dtype])
    err = rel_err(actual, expected)
    assert err <= bound, f"{what}: relative error {err:.3g} > {bound:.3g} (torch in {dtype}: " \
                         f"{rel_err(torch_same_dtype, expected):.3g})"
