// Registers the CUDA kernels of madfast::bn_lrelu (csrc/cuda/bn_lrelu.cuh) on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bn_lrelu.cuh"
#include "stream_launch.cuh"

namespace madfast {
namespace {

at::Tensor bn_lrelu_cuda(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, double slope) {
  const c10::cuda::CUDAGuard guard(y.device());
  return bn_lrelu::forward_gpu(y, scale, shift, slope, StreamLaunch{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_lrelu_backward_cuda(const at::Tensor& grad, const at::Tensor& y,
                                                                      const at::Tensor& scale, const at::Tensor& shift,
                                                                      double slope) {
  const c10::cuda::CUDAGuard guard(y.device());
  return bn_lrelu::backward_gpu(grad, y, scale, shift, slope, StreamLaunch{},
                                at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CUDA, m) {
  m.impl("bn_lrelu", &bn_lrelu_cuda);
  m.impl("bn_lrelu_backward", &bn_lrelu_backward_cuda);
}

}  // namespace madfast
