// CPU kernel of madfast::ema_update_.
#include <ATen/Parallel.h>

#include <algorithm>
#include <torch/library.h>

#include "cpu_vectorize.h"
#include "ema.h"

namespace madfast {
namespace {

// The AVX2 clone also vectorizes the fp16/bf16 conversions. `begin` is the span's offset in its
// tensor (the element index of stochastic rounding's random bits).
template <typename ema_t, typename param_t>
MADFAST_CPU_CLONES void ema_span(ema_t* __restrict__ ema, const param_t* __restrict__ param, int64_t begin,
                                 int64_t n, at::opmath_type<ema_t> w, bool stochastic, uint64_t pair_key) {
  using acc_t = at::opmath_type<ema_t>;
  if (w == acc_t(1)) {  // decay 0: an exact copy
    for (int64_t i = 0; i < n; ++i) ema[i] = static_cast<ema_t>(static_cast<acc_t>(param[i]));
  } else if (!stochastic) {
    for (int64_t i = 0; i < n; ++i)
      ema[i] = static_cast<ema_t>(ema_value(static_cast<acc_t>(ema[i]), static_cast<acc_t>(param[i]), w));
  } else {
    for (int64_t i = 0; i < n; ++i) ema[i] = ema_element(ema[i], param[i], w, true, pair_key, begin + i);
  }
}

// One parallel region per dtype group over the concatenated index space of its tensors
// (like the CUDA kernel's single launch), so many small tensors cost no per-tensor fork.
template <typename ema_t, typename param_t>
void ema_group_cpu(const std::vector<FlatPair>& pairs, const EmaScalars& s) {
  const auto w = ema_weight<at::opmath_type<ema_t>>(s);
  std::vector<int64_t> starts(pairs.size() + 1, 0);  // starts[i]: first global index of tensor i
  for (size_t i = 0; i < pairs.size(); ++i) starts[i + 1] = starts[i] + pairs[i].ema.numel();
  at::parallel_for(0, starts.back(), /*grain_size=*/1 << 16, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (int64_t i = begin; i < end; ++t) {
      const int64_t stop = std::min(end, starts[t + 1]);
      const int64_t offset = i - starts[t];
      ema_span(pairs[t].ema.template data_ptr<ema_t>() + offset,
               pairs[t].param.template const_data_ptr<param_t>() + offset, offset, stop - i, w, s.stochastic,
               s.stochastic ? sr_pair_key(s.call_key, pairs[t].index) : 0);
      i = stop;
    }
  });
}

// host_table / table: the CUDA kernel's cached pointer table (unused on the CPU).
void ema_update_cpu(at::TensorList ema, at::TensorList params, const c10::optional<at::Tensor>& decay,
                    double decay_value, int64_t sr_seed, int64_t sr_step, const c10::optional<at::Tensor>&,
                    const c10::optional<at::Tensor>&) {
  check_ema_args(ema, params, decay);
  if (ema.empty()) return;
  TORCH_CHECK_VALUE(ema[0].device().is_cpu(), "ema_update_ (CPU kernel): tensors must be on the CPU");
  at::Tensor keep;
  const EmaScalars s = ema_scalars(decay, decay_value, sr_seed, sr_step, keep);  // a CPU decay: no sync
  EmaGroups(ema, params).run(ema, params, [&](const std::vector<FlatPair>& pairs, auto e_tag, auto p_tag, size_t) {
    ema_group_cpu<typename decltype(e_tag)::type, typename decltype(p_tag)::type>(pairs, s);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }

}  // namespace madfast
