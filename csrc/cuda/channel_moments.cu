// Registers the CUDA kernels of madfast::channel_moments (csrc/cuda/channel_moments.cuh) on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "channel_moments.cuh"
#include "stream_launch.cuh"

namespace madfast {
namespace {

std::tuple<at::Tensor, at::Tensor> channel_moments_cuda(const at::Tensor& input) {
  const c10::cuda::CUDAGuard guard(input.device());
  return moments::forward_gpu(input, StreamLaunch{});
}

at::Tensor channel_moments_backward_cuda(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                         const at::Tensor& input, const at::Tensor& mean) {
  const c10::cuda::CUDAGuard guard(input.device());
  return moments::backward_gpu(grad_mean, grad_var, input, mean, StreamLaunch{});
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CUDA, m) {
  m.impl("channel_moments", &channel_moments_cuda);
  m.impl("channel_moments_backward", &channel_moments_backward_cuda);
}

}  // namespace madfast
