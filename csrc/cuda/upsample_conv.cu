// Registers the CUDA kernels of madfast::upsample_conv (csrc/cuda/upsample_conv.cuh) on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "stream_launch.cuh"
#include "upsample_conv.cuh"

namespace madfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> upsample_conv_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                  bool stats) {
  const c10::cuda::CUDAGuard guard(x.device());
  return upsample::forward_gpu(x, weight, stats, StreamLaunch{});
}

std::tuple<at::Tensor, at::Tensor> upsample_conv_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                               const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& y,
                                                               const std::optional<at::Tensor>& grad_sum,
                                                               const std::optional<at::Tensor>& grad_sumsq,
                                                               bool grad_input, bool grad_weight) {
  const c10::cuda::CUDAGuard guard(x.device());
  return upsample::backward_gpu(grad_y, x, weight, y, grad_sum, grad_sumsq, grad_input, grad_weight, StreamLaunch{},
                                at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CUDA, m) {
  m.impl("upsample_conv", &upsample_conv_cuda);
  m.impl("upsample_conv_backward", &upsample_conv_backward_cuda);
}

}  // namespace madfast
