// Shared by the CPU and CUDA EMA kernels: argument checks, dtype dispatch, the per-element math
// (lerp, exact copy, stochastic rounding and its counter-based random bits) and the flat-memory
// view both kernels process.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "host_device.h"

namespace madfast {

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<ema_t>, Tag<param_t>) for any pair of floating dtypes (fp64, fp32, fp16, bf16): an
// EMA may be kept in another precision than the model (timm's `dtype`). The math runs in the EMA's
// accumulation type (fp64 for an fp64 EMA, else fp32).
template <typename F>
void dispatch_ema_pair(at::ScalarType ema, at::ScalarType param, F&& f) {
  using ST = at::ScalarType;
  const auto with_param = [&](auto e_tag) {
    switch (param) {
      case ST::Double: return f(e_tag, Tag<double>{}), true;
      case ST::Float: return f(e_tag, Tag<float>{}), true;
      case ST::Half: return f(e_tag, Tag<at::Half>{}), true;
      case ST::BFloat16: return f(e_tag, Tag<at::BFloat16>{}), true;
      default: return false;
    }
  };
  bool ok = false;
  switch (ema) {
    case ST::Double: ok = with_param(Tag<double>{}); break;
    case ST::Float: ok = with_param(Tag<float>{}); break;
    case ST::Half: ok = with_param(Tag<at::Half>{}); break;
    case ST::BFloat16: ok = with_param(Tag<at::BFloat16>{}); break;
    default: break;
  }
  TORCH_CHECK_TYPE(ok, "ema_update_: an EMA of dtype ", ema, " cannot track tensors of dtype ", param,
                   " (supported: float64, float32, float16, bfloat16, in any combination)");
}

// Validates the whole call before anything is modified: O(1) work per pair, in C++.
inline void check_ema_args(at::TensorList ema, at::TensorList params, const c10::optional<at::Tensor>& decay) {
  TORCH_CHECK_VALUE(ema.size() == params.size(), "ema_update_: ema_tensors and tensors must have the same length, got ",
                    ema.size(), " and ", params.size());
  if (decay.has_value()) {
    TORCH_CHECK_VALUE(decay->dim() == 0 && decay->is_floating_point(),
                      "ema_update_: decay must be a 0-d floating tensor, got shape ", decay->sizes(), " and dtype ",
                      decay->scalar_type());
    if (!ema.empty()) {
      TORCH_CHECK_VALUE(decay->device().is_cpu() || decay->device() == ema[0].device(),
                        "ema_update_: decay must be on the CPU or on the tensors' device ", ema[0].device(), ", got ",
                        decay->device());
    }
  }
  for (size_t i = 0; i < ema.size(); ++i) {
    const at::Tensor& e = ema[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(e.device() == p.device(), "ema_update_: device mismatch at index ", i, ": ema_tensors[", i,
                      "] is on ", e.device(), ", tensors[", i, "] on ", p.device());
    TORCH_CHECK_VALUE(e.device() == ema[0].device(), "ema_update_: device mismatch at index ", i,
                      ": one call takes tensors on one device; ema_tensors[", i, "] is on ", e.device(),
                      ", ema_tensors[0] on ", ema[0].device());
    TORCH_CHECK_VALUE(e.sizes() == p.sizes(), "ema_update_: shape mismatch at index ", i, ": ema_tensors[", i,
                      "] has shape ", e.sizes(), ", tensors[", i, "] has shape ", p.sizes());
    TORCH_CHECK_TYPE(!e.is_complex() && !p.is_complex(), "ema_update_: ema_tensors[", i, "] / tensors[", i,
                     "] are complex (", e.scalar_type(), ", ", p.scalar_type(), "); complex EMAs are not supported");
    if (e.is_floating_point()) {
      dispatch_ema_pair(e.scalar_type(), p.scalar_type(), [](auto, auto) {});
    } else {
      TORCH_CHECK_TYPE(e.scalar_type() == p.scalar_type(), "ema_update_: ema_tensors[", i, "] has dtype ",
                       e.scalar_type(), ", which is copied, not averaged; tensors[", i, "] must have the same dtype, got ",
                       p.scalar_type());
    }
  }
}

// ---- per-element math, shared by the CPU and CUDA kernels ----

// torch.lerp's formula with its fused multiply-add (ATen's vectorized CPU lerp_vec; nvcc contracts
// the CUDA one), so that an update matches timm's _foreach_lerp_; weight == 1 (decay 0: timm's set()
// and warm-up steps) is an exact copy, as copy_ is -- a lerp would keep a NaN or turn 1e8 into 0.
template <typename acc_t>
MADFAST_HD acc_t ema_value(acc_t e, acc_t p, acc_t w) {
  if (w == acc_t(1)) return p;
  return w < acc_t(0.5) ? std::fma(w, p - e, e) : std::fma(w - acc_t(1), p - e, p);
}

// splitmix64's finaliser: the random bits of stochastic rounding are a hash of (seed, step, pair
// index, element index) -- no generator state, reproducible, the same on every backend.
MADFAST_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
inline uint64_t sr_call_key(int64_t seed, int64_t step) {
  return mix64(mix64(static_cast<uint64_t>(seed)) ^ static_cast<uint64_t>(step));
}
MADFAST_HD uint64_t sr_pair_key(uint64_t call_key, int64_t pair) { return mix64(call_key ^ static_cast<uint64_t>(pair)); }
// A uniform number in [0, 1) on a 2^-24 grid for element i of a pair.
MADFAST_HD float sr_uniform(uint64_t pair_key, int64_t i) {
  return static_cast<float>(mix64(pair_key + static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull) >> 40) *
         (1.0f / 16777216.0f);
}

template <typename T>
MADFAST_HD T from_bits(uint16_t bits) {
  T out;
  out.x = bits;
  return out;
}

// x rounded to T (fp16 or bf16) stochastically: to the neighbour toward zero or away from it, away
// with probability (|x| - |down|) / (|up| - |down|), so that E[result] = x and updates far below
// T's resolution accumulate in expectation instead of rounding away. Non-finite x rounds to nearest.
template <typename T>
MADFAST_HD T stochastic_round(float x, float u) {
  T down(x);  // round to nearest, then one step toward zero if that went past x
  if (!(fabsf(x) < INFINITY)) return down;
  if (fabsf(static_cast<float>(down)) > fabsf(x)) down = from_bits<T>(static_cast<uint16_t>(down.x - 1));
  const float lo = fabsf(static_cast<float>(down));
  if (lo == fabsf(x)) return down;
  const T up = from_bits<T>(static_cast<uint16_t>(down.x + 1));  // sign-magnitude: +1 is away from zero
  const float p = (fabsf(x) - lo) / (fabsf(static_cast<float>(up)) - lo);  // 0 when up is inf
  return u < p ? up : down;
}

// The stored value of one element: exact copy, lerp, then rounding to nearest or stochastic.
template <typename ema_t, typename param_t>
MADFAST_HD ema_t ema_element(ema_t e, param_t p, at::opmath_type<ema_t> w, bool stochastic, uint64_t pair_key,
                             int64_t i) {
  using acc_t = at::opmath_type<ema_t>;
  const acc_t v = ema_value(static_cast<acc_t>(e), static_cast<acc_t>(p), w);
  if constexpr (std::is_same_v<ema_t, at::Half> || std::is_same_v<ema_t, at::BFloat16>) {
    if (stochastic && w != acc_t(1)) return stochastic_round<ema_t>(v, sr_uniform(pair_key, i));
  }
  return static_cast<ema_t>(v);
}

// ---- host side ----

// What every kernel of one call needs besides the tensors: the weight 1 - decay, formed in double
// from a float decay (rounding decay to fp32 first would be off by 1.7e-4 relative at 0.9999); or
// a device scalar to read (decay_kind 1: fp32, 2: fp64); and the stochastic-rounding key.
struct EmaScalars {
  double weight = 0;                 // 1 - decay, when decay_ptr is null
  const void* decay_ptr = nullptr;   // a device scalar, read by the kernel
  int decay_kind = 0;
  bool stochastic = false;
  uint64_t call_key = 0;
};

// decay: a 0-d tensor (on the CPU: read here, no sync; on the device: read by the kernel), else
// decay_value. sr_seed < 0 turns stochastic rounding off.
inline EmaScalars ema_scalars(const c10::optional<at::Tensor>& decay, double decay_value, int64_t sr_seed,
                              int64_t sr_step, at::Tensor& decay_keepalive) {
  EmaScalars s;
  if (decay.has_value() && decay->device().is_cpu()) {
    s.weight = 1.0 - decay->item<double>();
  } else if (decay.has_value()) {
    decay_keepalive = decay->scalar_type() == at::kDouble ? *decay : decay->to(at::kFloat);  // fp32, fp64 read as is
    s.decay_ptr = decay_keepalive.const_data_ptr();
    s.decay_kind = decay_keepalive.scalar_type() == at::kDouble ? 2 : 1;
  } else {
    s.weight = 1.0 - decay_value;
  }
  s.stochastic = sr_seed >= 0;
  if (s.stochastic) s.call_key = sr_call_key(sr_seed, sr_step);
  return s;
}

// The weight a kernel uses: 1 - d in double only for an fp64 decay; an fp32 decay's 1 - d is
// exact in fp32 for d in [0.5, 1] (Sterbenz) and within 2^-24 relative below.
template <typename acc_t>
MADFAST_HD acc_t ema_weight(const EmaScalars& s) {
  if (s.decay_kind == 1) return acc_t(1.0f - *static_cast<const float*>(s.decay_ptr));
  if (s.decay_kind == 2) return acc_t(1.0 - *static_cast<const double*>(s.decay_ptr));
  return acc_t(s.weight);
}

// A pair the kernels can treat as two flat arrays of numel() elements in memory order.
// Tensors with the same dense layout (contiguous, channels_last, ...) are used as they
// are; anything else goes through contiguous copies, and write_back() stores the result.
struct FlatPair {
  at::Tensor ema;     // what the kernel updates
  at::Tensor param;   // what the kernel reads
  at::Tensor target;  // defined when ema is a temporary copy of it
  int64_t index;      // the pair's index in the call's lists (stochastic rounding's counter)

  FlatPair(const at::Tensor& e, const at::Tensor& p, int64_t i) : index(i) {
    if (!e.is_non_overlapping_and_dense()) {
      target = e;
      ema = e.contiguous();
      param = p.contiguous();
    } else {
      ema = e;
      param = p.strides() == e.strides() ? p : at::empty_like(e, p.options()).copy_(p);
    }
  }

  // True when no temporary was made: the addresses are the tensors' own, stable across calls.
  bool direct(const at::Tensor& p) const { return !target.defined() && param.is_same(p); }

  void write_back() const {
    if (target.defined()) target.copy_(ema);
  }
};

using DtypeGroups = std::vector<std::pair<std::pair<at::ScalarType, at::ScalarType>, std::vector<size_t>>>;

// Indices of the floating pairs, grouped by (ema dtype, tensor dtype): one launch per group.
inline DtypeGroups group_by_dtypes(at::TensorList ema, at::TensorList params) {
  DtypeGroups groups;
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

// The flat pairs of every dtype group, built once per call.
struct EmaGroups {
  std::vector<std::pair<std::pair<at::ScalarType, at::ScalarType>, std::vector<FlatPair>>> groups;
  bool direct = true;  // no pair needed a temporary

  EmaGroups(at::TensorList ema, at::TensorList params) {
    for (const auto& group : group_by_dtypes(ema, params)) {
      std::vector<FlatPair> pairs;
      pairs.reserve(group.second.size());
      for (size_t i : group.second) {
        pairs.emplace_back(ema[i], params[i], static_cast<int64_t>(i));
        direct = direct && pairs.back().direct(params[i]);
      }
      groups.emplace_back(group.first, std::move(pairs));
    }
  }

  // run_group(pairs, Tag<ema_t>, Tag<param_t>, group number) per group, then the write-backs of
  // copied non-dense EMAs, then the non-floating copies.
  template <typename F>
  void run(at::TensorList ema, at::TensorList params, F&& run_group) const {
    for (size_t g = 0; g < groups.size(); ++g) {
      dispatch_ema_pair(groups[g].first.first, groups[g].first.second,
                        [&](auto e_tag, auto p_tag) { run_group(groups[g].second, e_tag, p_tag, g); });
      for (const auto& pair : groups[g].second) pair.write_back();
    }
    copy_non_floating(ema, params);
  }
};

}  // namespace madfast
