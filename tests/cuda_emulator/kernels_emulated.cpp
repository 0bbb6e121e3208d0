// madfast's CUDA kernels (csrc/cuda/*.cuh), host side included, run on CPU tensors through the
// emulator; built by tests/test_cuda_emulated.py. Each function is the CUDA op of the same name.
#include <torch/extension.h>

#include "cuda_emulator.h"
// after the emulator, which defines the CUDA keywords they use
#include "cuda/bn_lrelu.cuh"
#include "cuda/bn_stat_losses.cuh"
#include "cuda/channel_moments.cuh"
#include "cuda/ema.cuh"
#include "cuda/logit_losses.cuh"

namespace {

struct EmulatedLaunch {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) const {
    cuda_emulator::launch(kernel, grid, block, args...);
  }
};

using Optional = std::optional<at::Tensor>;

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace mf = madfast;
  const EmulatedLaunch launch;
  m.def("bn_lrelu", [=](const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, double slope) {
    return mf::bn_lrelu::forward_gpu(y, scale, shift, slope, launch);
  });
  // sm_count: the multiprocessors the reductions split for (small: few blocks; large: many)
  m.def("bn_lrelu_backward", [=](const at::Tensor& g, const at::Tensor& y, const at::Tensor& scale,
                                 const at::Tensor& shift, double slope, int64_t sm_count) {
    return mf::bn_lrelu::backward_gpu(g, y, scale, shift, slope, launch, sm_count);
  });
  m.def("channel_moments", [=](const at::Tensor& x) { return mf::moments::forward_gpu(x, launch); });
  m.def("channel_moments_backward", [=](const at::Tensor& gm, const at::Tensor& gv, const at::Tensor& x,
                                        const at::Tensor& mean, int64_t max_blocks) {
    return mf::moments::backward_gpu(gm, gv, x, mean, launch, max_blocks);
  });
  m.def("bn_stat_losses", [=](std::vector<at::Tensor> xs, std::vector<at::Tensor> rms, std::vector<at::Tensor> rvs) {
    return mf::bn_losses::forward_gpu(xs, rms, rvs, launch);
  });
  m.def("bn_stat_losses_backward", [=](const at::Tensor& g, std::vector<at::Tensor> xs, std::vector<at::Tensor> rms,
                                       std::vector<at::Tensor> rvs, const at::Tensor& moments,
                                       const at::Tensor& norms) {
    return mf::bn_losses::backward_gpu(g, xs, rms, rvs, moments, norms, launch);
  });
  // the CUDA op's arguments; the "device" tables are CPU tensors here
  m.def("ema_update_", [=](std::vector<at::Tensor> ema, std::vector<at::Tensor> params, const Optional& decay,
                           double decay_value, int64_t sr_seed, int64_t sr_step, const Optional& host_table,
                           const Optional& table) {
    mf::check_ema_args(ema, params, decay);
    if (!ema.empty())
      mf::ema_kernels::update_gpu(ema, params, decay, decay_value, sr_seed, sr_step, host_table, table, launch);
  });
  // The path taken while a CUDA graph is captured: the per-call table written by fill kernels.
  m.def("ema_update_captured", [=](std::vector<at::Tensor> ema, std::vector<at::Tensor> params, const Optional& decay,
                                   double decay_value, int64_t sr_seed, int64_t sr_step) {
    mf::check_ema_args(ema, params, decay);
    if (!ema.empty())
      mf::ema_kernels::update_gpu(ema, params, decay, decay_value, sr_seed, sr_step, c10::nullopt, c10::nullopt,
                                  launch, /*capturing=*/true);
  });
  m.def("kl_div_fwd", [=](const at::Tensor& s, const at::Tensor& t, double tau, std::string reduction, double sign,
                          std::optional<double> bound) {
    return mf::logit_kernels::kl_div_fwd_gpu(s, t, tau, reduction, sign, bound, launch);
  });
  m.def("kl_div_bwd", [=](const at::Tensor& g, const at::Tensor& s, const at::Tensor& t, const at::Tensor& stats,
                          const at::Tensor& total, double tau, std::string reduction, double sign,
                          std::optional<double> bound, bool gs, bool gt) {
    return mf::logit_kernels::kl_div_bwd_gpu(g, s, t, stats, total, tau, reduction, sign, bound, gs, gt, launch);
  });
  m.def("l1_fwd", [=](const at::Tensor& s, const at::Tensor& t, std::string reduction, double sign,
                      std::optional<double> bound) {
    return mf::logit_kernels::l1_fwd_gpu(s, t, reduction, sign, bound, launch);
  });
  m.def("l1_bwd", [=](const at::Tensor& g, const at::Tensor& s, const at::Tensor& t, const at::Tensor& total,
                      std::string reduction, double sign, std::optional<double> bound, bool gs, bool gt) {
    return mf::logit_kernels::l1_bwd_gpu(g, s, t, total, reduction, sign, bound, gs, gt, launch);
  });
}
