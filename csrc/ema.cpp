// CPU kernel of madfast::ema_update_.
#include <ATen/Parallel.h>

#include <algorithm>
#include <torch/library.h>

#include "cpu_vectorize.h"
#include "ema.h"

namespace madfast {
namespace {

template <typename ema_t>
using acc_weight = at::opmath_type<ema_t>;

// The AVX2 clone also vectorizes the fp16/bf16 conversions.
template <typename ema_t, typename param_t>
MADFAST_CPU_CLONES void ema_span(ema_t* __restrict__ ema, const param_t* __restrict__ param, int64_t n,
                                 acc_weight<ema_t> weight) {
  using acc_t = at::opmath_type<ema_t>;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t e = static_cast<acc_t>(ema[i]);
    ema[i] = static_cast<ema_t>(e + weight * (static_cast<acc_t>(param[i]) - e));
  }
}

// One parallel region per dtype group over the concatenated index space of its tensors
// (like the CUDA kernel's single launch), so many small tensors cost no per-tensor fork.
template <typename ema_t, typename param_t>
void ema_group_cpu(const std::vector<FlatPair>& pairs, double decay) {
  const acc_weight<ema_t> weight = static_cast<acc_weight<ema_t>>(1.0 - decay);
  std::vector<int64_t> starts(pairs.size() + 1, 0);  // starts[i]: first global index of tensor i
  for (size_t i = 0; i < pairs.size(); ++i) starts[i + 1] = starts[i] + pairs[i].ema.numel();
  at::parallel_for(0, starts.back(), /*grain_size=*/1 << 16, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (int64_t i = begin; i < end; ++t) {
      const int64_t stop = std::min(end, starts[t + 1]);
      const int64_t offset = i - starts[t];
      ema_span(pairs[t].ema.template data_ptr<ema_t>() + offset,
               pairs[t].param.template const_data_ptr<param_t>() + offset, stop - i, weight);
      i = stop;
    }
  });
}

void ema_update_cpu(at::TensorList ema, at::TensorList params, const at::Tensor& decay) {
  check_ema_args(ema, params, decay);
  if (ema.empty()) return;
  TORCH_CHECK_VALUE(ema[0].device().is_cpu(), "ema_update_ (CPU kernel): tensors must be on the CPU");
  const double d = decay.item<double>();  // a CPU tensor here: no device sync
  for_each_dtype_group(ema, params, [&](const std::vector<FlatPair>& pairs, auto e_tag, auto p_tag) {
    ema_group_cpu<typename decltype(e_tag)::type, typename decltype(p_tag)::type>(pairs, d);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }

}  // namespace madfast
