// How the .cu files launch the kernels of a .cuh: on the current stream, checked. The .cuh host code
// takes the launcher as a parameter so that tests can run the same kernels in a CPU emulator.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

namespace madfast {

struct StreamLaunch {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) const {
    kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace madfast
