// Registers the CUDA kernel of madfast::ema_update_ (csrc/cuda/ema.cuh) on the current stream.
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ema.cuh"
#include "stream_launch.cuh"

namespace madfast {
namespace {

void ema_update_cuda(at::TensorList ema, at::TensorList params, const c10::optional<at::Tensor>& decay,
                     double decay_value, int64_t sr_seed, int64_t sr_step, const c10::optional<at::Tensor>& host_table,
                     const c10::optional<at::Tensor>& table) {
  check_ema_args(ema, params, decay);
  if (ema.empty()) return;
  TORCH_CHECK_VALUE(ema[0].is_cuda(), "ema_update_ (CUDA kernel): tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(ema[0].device());
  // While a CUDA graph is captured, a per-call table is written by kernels, not copied from the host.
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  ema_kernels::update_gpu(ema, params, decay, decay_value, sr_seed, sr_step, host_table, table, StreamLaunch{},
                          capturing);
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CUDA, m) { m.impl("ema_update_", &ema_update_cuda); }

}  // namespace madfast
