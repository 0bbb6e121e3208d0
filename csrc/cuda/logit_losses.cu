// Registers the CUDA kernels of madfast::kl_div_fwd / kl_div_bwd / l1_fwd / l1_bwd
// (csrc/cuda/logit_losses.cuh) on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "logit_losses.cuh"
#include "stream_launch.cuh"

namespace madfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_fwd_cuda(const at::Tensor& s, const at::Tensor& t, double tau,
                                                               c10::string_view reduction, double sign,
                                                               std::optional<double> bound) {
  const c10::cuda::CUDAGuard guard(s.device());
  return logit_kernels::kl_div_fwd_gpu(s, t, tau, reduction, sign, bound, StreamLaunch{});
}

std::tuple<at::Tensor, at::Tensor> kl_div_bwd_cuda(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& t,
                                                   const at::Tensor& stats, const at::Tensor& total, double tau,
                                                   c10::string_view reduction, double sign,
                                                   std::optional<double> bound, bool grad_s, bool grad_t) {
  const c10::cuda::CUDAGuard guard(s.device());
  return logit_kernels::kl_div_bwd_gpu(grad, s, t, stats, total, tau, reduction, sign, bound, grad_s, grad_t,
                                       StreamLaunch{});
}

std::tuple<at::Tensor, at::Tensor> l1_fwd_cuda(const at::Tensor& s, const at::Tensor& t, c10::string_view reduction,
                                               double sign, std::optional<double> bound) {
  const c10::cuda::CUDAGuard guard(s.device());
  return logit_kernels::l1_fwd_gpu(s, t, reduction, sign, bound, StreamLaunch{});
}

std::tuple<at::Tensor, at::Tensor> l1_bwd_cuda(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& t,
                                               const at::Tensor& total, c10::string_view reduction, double sign,
                                               std::optional<double> bound, bool grad_s, bool grad_t) {
  const c10::cuda::CUDAGuard guard(s.device());
  return logit_kernels::l1_bwd_gpu(grad, s, t, total, reduction, sign, bound, grad_s, grad_t, StreamLaunch{});
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CUDA, m) {
  m.impl("kl_div_fwd", &kl_div_fwd_cuda);
  m.impl("kl_div_bwd", &kl_div_bwd_cuda);
  m.impl("l1_fwd", &l1_fwd_cuda);
  m.impl("l1_bwd", &l1_bwd_cuda);
}

}  // namespace madfast
