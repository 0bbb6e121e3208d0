"""Builds madfast._C: the CPU kernels always, the CUDA kernels when nvcc and a CUDA build of
torch are present (no GPU needed). MADFAST_CUDA=0|1 forces CUDA off/on; DEBUG=1 gives -O0 -g;
TORCH_CUDA_ARCH_LIST picks the GPUs (default: sm_80 and sm_90, plus PTX)."""

import glob
import importlib.util
import os

# A wrapper script on PATH for nvcc would make cpp_extension guess CUDA_HOME from its folder.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def build_cuda() -> bool:
    forced = os.environ.get("MADFAST_CUDA")
    found = torch.version.cuda is not None and CUDA_HOME is not None
    if forced == "1" and not found:
        raise RuntimeError("MADFAST_CUDA=1 but nvcc or a CUDA build of torch is missing")
    return found if forced is None else forced == "1"


def nvidia_wheel_includes() -> list[str]:
    # The CUDA build of torch takes cuSPARSE, cuBLAS, ... headers from pip's nvidia packages.
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return sorted(d for root in roots for d in glob.glob(os.path.join(root, "*", "include")))


debug = os.environ.get("DEBUG") == "1"
opt = ["-O0", "-g"] if debug else ["-O3"]
use_cuda = build_cuda()
sources = sorted(glob.glob("csrc/*.cpp")) + (sorted(glob.glob("csrc/cuda/*.cu")) if use_cuda else [])
if use_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

Extension = CUDAExtension if use_cuda else CppExtension  # the one line that picks the build
ext = Extension(
    "madfast._C",
    sources,
    include_dirs=nvidia_wheel_includes() if use_cuda else [],
    define_macros=[("MADFAST_PYTHON_MODULE", None)] + ([("MADFAST_WITH_CUDA", None)] if use_cuda else []),
    # -fopenmp: at::parallel_for is an OpenMP pragma in the headers, serial without it.
    # -fno-trapping-math: lets GCC if-convert float selects, so the CPU loops vectorize.
    # cpp_extension picks the C++ standard torch needs.
    extra_compile_args={"cxx": opt + ["-fopenmp", "-fno-trapping-math"], "nvcc": opt + ["-lineinfo"]},
    extra_link_args=["-fopenmp"] + (["-g"] if debug else []),
)

setup(
    packages=find_packages(include=["madfast", "madfast.*"]),
    package_data={"madfast": ["verified.json"]},  # the committed verified-dispatch measurements
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
)
