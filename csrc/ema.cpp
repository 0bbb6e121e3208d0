// CPU kernel of madfast::ema_update_.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ema.h"

namespace madfast {
namespace {

template <typename ema_t, typename param_t>
void ema_flat_cpu(ema_t* ema, const param_t* param, int64_t n, double decay) {
  using acc_t = at::opmath_type<ema_t>;
  const acc_t weight = static_cast<acc_t>(1.0 - decay);
  at::parallel_for(0, n, /*grain_size=*/1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t e = static_cast<acc_t>(ema[i]);
      ema[i] = static_cast<ema_t>(e + weight * (static_cast<acc_t>(param[i]) - e));
    }
  });
}

void ema_update_cpu(at::TensorList ema, at::TensorList params, const at::Tensor& decay) {
  check_ema_args(ema, params, decay);
  if (ema.empty()) return;
  TORCH_CHECK_VALUE(ema[0].device().is_cpu(), "ema_update_ (CPU kernel): tensors must be on the CPU");
  const double d = decay.item<double>();  // a CPU tensor here: no device sync
  for (size_t i = 0; i < ema.size(); ++i) {
    if (!ema[i].is_floating_point() || ema[i].numel() == 0) continue;
    FlatPair pair(ema[i], params[i]);
    dispatch_ema_pair(pair.ema.scalar_type(), pair.param.scalar_type(), [&](auto e_tag, auto p_tag) {
      using ema_t = typename decltype(e_tag)::type;
      using param_t = typename decltype(p_tag)::type;
      ema_flat_cpu(pair.ema.data_ptr<ema_t>(), pair.param.const_data_ptr<param_t>(), pair.ema.numel(), d);
    });
    pair.write_back();
  }
  copy_non_floating(ema, params);
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }

}  // namespace madfast
