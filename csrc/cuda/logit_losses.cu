// Registers the CUDA kernels of madfast::kl_div_fwd and l1_fwd (csrc/cuda/logit_losses.cuh) on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "logit_losses.cuh"
#include "stream_launch.cuh"

namespace madfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                               double temperature, bool grad_s, bool grad_t) {
  const c10::cuda::CUDAGuard guard(student.device());
  return logit_kernels::kl_div_fwd_gpu(student, teacher, temperature, grad_s, grad_t, StreamLaunch{});
}

std::tuple<at::Tensor, at::Tensor> l1_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher, bool grad_s) {
  const c10::cuda::CUDAGuard guard(student.device());
  return logit_kernels::l1_fwd_gpu(student, teacher, grad_s, StreamLaunch{});
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CUDA, m) {
  m.impl("kl_div_fwd", &kl_div_fwd_cuda);
  m.impl("l1_fwd", &l1_fwd_cuda);
}

}  // namespace madfast
