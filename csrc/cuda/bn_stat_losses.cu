// Registers the CUDA kernels of madfast::bn_stat_losses (csrc/cuda/bn_stat_losses.cuh) on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bn_stat_losses.cuh"
#include "stream_launch.cuh"

namespace madfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_stat_losses_cuda(at::TensorList xs, at::TensorList rms,
                                                                   at::TensorList rvs) {
  TORCH_CHECK_VALUE(!xs.empty(), "bn_stat_losses: x must hold at least one tensor");
  const c10::cuda::CUDAGuard guard(xs[0].device());
  return bn_losses::forward_gpu(xs, rms, rvs, StreamLaunch{});
}

std::vector<at::Tensor> bn_stat_losses_backward_cuda(const at::Tensor& grad, at::TensorList xs, at::TensorList rms,
                                                     at::TensorList rvs, const at::Tensor& moments,
                                                     const at::Tensor& norms) {
  TORCH_CHECK_VALUE(!xs.empty(), "bn_stat_losses_backward: x must hold at least one tensor");
  const c10::cuda::CUDAGuard guard(xs[0].device());
  return bn_losses::backward_gpu(grad, xs, rms, rvs, moments, norms, StreamLaunch{});
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CUDA, m) {
  m.impl("bn_stat_losses", &bn_stat_losses_cuda);
  m.impl("bn_stat_losses_backward", &bn_stat_losses_backward_cuda);
}

}  // namespace madfast
