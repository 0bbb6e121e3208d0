// Shared by the CPU and CUDA EMA kernels: argument checks, dtype dispatch and
// the flat-memory view both kernels process.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <utility>
#include <vector>

namespace madfast {

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<ema_t>, Tag<param_t>) for the supported (ema, tensor) dtype pairs:
// equal floating dtypes, or an fp32 EMA of fp16/bf16 tensors.
template <typename F>
void dispatch_ema_pair(at::ScalarType ema, at::ScalarType param, F&& f) {
  using ST = at::ScalarType;
  if (ema == param) {
    switch (ema) {
      case ST::Double: return f(Tag<double>{}, Tag<double>{});
      case ST::Float: return f(Tag<float>{}, Tag<float>{});
      case ST::Half: return f(Tag<at::Half>{}, Tag<at::Half>{});
      case ST::BFloat16: return f(Tag<at::BFloat16>{}, Tag<at::BFloat16>{});
      default: break;
    }
  } else if (ema == ST::Float && param == ST::Half) {
    return f(Tag<float>{}, Tag<at::Half>{});
  } else if (ema == ST::Float && param == ST::BFloat16) {
    return f(Tag<float>{}, Tag<at::BFloat16>{});
  }
  TORCH_CHECK_TYPE(false, "ema_update_: an EMA of dtype ", ema, " cannot track tensors of dtype ", param,
                   " (supported: equal floating dtypes, or a float32 EMA of float16/bfloat16)");
}

// Validates the whole call before anything is modified.
inline void check_ema_args(at::TensorList ema, at::TensorList params, const at::Tensor& decay) {
  TORCH_CHECK_VALUE(ema.size() == params.size(), "ema_update_: ema_tensors and tensors must have the same length, got ",
                    ema.size(), " and ", params.size());
  TORCH_CHECK_VALUE(decay.dim() == 0 && decay.is_floating_point(),
                    "ema_update_: decay must be a 0-d floating tensor, got shape ", decay.sizes(), " and dtype ",
                    decay.scalar_type());
  if (!ema.empty()) {
    TORCH_CHECK_VALUE(decay.device().is_cpu() || decay.device() == ema[0].device(),
                      "ema_update_: decay must be on the CPU or on the tensors' device ", ema[0].device(), ", got ",
                      decay.device());
  }
  for (size_t i = 0; i < ema.size(); ++i) {
    const at::Tensor& e = ema[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(e.device() == ema[0].device() && p.device() == e.device(),
                      "ema_update_: all tensors must be on one device; ema_tensors[", i, "] is on ", e.device(),
                      ", tensors[", i, "] on ", p.device(), ", ema_tensors[0] on ", ema[0].device());
    TORCH_CHECK_VALUE(e.sizes() == p.sizes(), "ema_update_: shape mismatch at index ", i, ": ema_tensors[", i,
                      "] has shape ", e.sizes(), ", tensors[", i, "] has shape ", p.sizes());
    if (e.is_floating_point()) {
      dispatch_ema_pair(e.scalar_type(), p.scalar_type(), [](auto, auto) {});
    } else {
      TORCH_CHECK_TYPE(e.scalar_type() == p.scalar_type(), "ema_update_: ema_tensors[", i, "] has dtype ",
                       e.scalar_type(), ", which is copied, not averaged; tensors[", i, "] must have the same dtype, got ",
                       p.scalar_type());
    }
  }
}

// A pair the kernels can treat as two flat arrays of numel() elements in memory order.
// Tensors with the same dense layout (contiguous, channels_last, ...) are used as they
// are; anything else goes through contiguous copies, and write_back() stores the result.
struct FlatPair {
  at::Tensor ema;    // what the kernel updates
  at::Tensor param;  // what the kernel reads
  at::Tensor target; // defined when ema is a temporary copy of it

  FlatPair(const at::Tensor& e, const at::Tensor& p) {
    if (!e.is_non_overlapping_and_dense()) {
      target = e;
      ema = e.contiguous();
      param = p.contiguous();
    } else {
      ema = e;
      param = p.strides() == e.strides() ? p : at::empty_like(e, p.options()).copy_(p);
    }
  }

  void write_back() const {
    if (target.defined()) target.copy_(ema);
  }
};

// Indices of the floating pairs, grouped by (ema dtype, tensor dtype): one launch per group.
inline std::vector<std::pair<std::pair<at::ScalarType, at::ScalarType>, std::vector<size_t>>> group_by_dtypes(
    at::TensorList ema, at::TensorList params) {
  std::vector<std::pair<std::pair<at::ScalarType, at::ScalarType>, std::vector<size_t>>> groups;
  for (size_t i = 0; i < ema.size(); ++i) {
    if (!ema[i].is_floating_point() || ema[i].numel() == 0) continue;
    const auto key = std::make_pair(ema[i].scalar_type(), params[i].scalar_type());
    auto it = groups.begin();
    while (it != groups.end() && it->first != key) ++it;
    if (it == groups.end()) {
      groups.push_back({key, {}});
      it = std::prev(groups.end());
    }
    it->second.push_back(i);
  }
  return groups;
}

// Non-floating pairs (e.g. BatchNorm's num_batches_tracked) are copied, in one foreach call.
inline void copy_non_floating(at::TensorList ema, at::TensorList params);

// The body of both kernels' ops: run_group(pairs, Tag<ema_t>, Tag<param_t>) once per dtype group
// of floating pairs, then the write-backs of copied non-dense EMAs, then the non-floating copies.
template <typename F>
void for_each_dtype_group(at::TensorList ema, at::TensorList params, F&& run_group) {
  for (const auto& group : group_by_dtypes(ema, params)) {
    std::vector<FlatPair> pairs;
    pairs.reserve(group.second.size());
    for (size_t i : group.second) pairs.emplace_back(ema[i], params[i]);
    dispatch_ema_pair(group.first.first, group.first.second,
                      [&](auto e_tag, auto p_tag) { run_group(pairs, e_tag, p_tag); });
    for (const auto& pair : pairs) pair.write_back();
  }
  copy_non_floating(ema, params);
}

inline void copy_non_floating(at::TensorList ema, at::TensorList params) {
  std::vector<at::Tensor> dst, src;
  for (size_t i = 0; i < ema.size(); ++i) {
    if (!ema[i].is_floating_point()) {
      dst.push_back(ema[i]);
      src.push_back(params[i]);
    }
  }
  if (!dst.empty()) at::_foreach_copy_(dst, src);
}

}  // namespace madfast
