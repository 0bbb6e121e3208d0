// The CUDA kernel of madfast::ema_update_, and its host side (`launch` is supplied by the includer:
// csrc/cuda/ema.cu, or the CPU emulator in tests/cuda_emulator). One launch per (ema dtype, tensor
// dtype) group, whatever the number of tensors. Each CTA owns kChunk elements of one tensor and
// finds that tensor by binary search in a device table of (ema address, tensor address, numel,
// first CTA) rows -- apex's multi-tensor idea without its per-launch tensor cap.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <vector>

#include "../ema.h"

namespace madfast {
namespace ema_kernels {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;  // elements per CTA; a multiple of kThreads * every vector width
constexpr int kTableCols = 4;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

template <typename ema_t, typename param_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    ema_multi_tensor_kernel(const int64_t* __restrict__ table,  // [n_tensors, 4]
                            int64_t n_tensors, const at::opmath_type<ema_t>* __restrict__ decay) {
  using acc_t = at::opmath_type<ema_t>;
  const int64_t block = blockIdx.x;

  // Last row whose first CTA is <= this CTA.
  int64_t lo = 0, hi = n_tensors - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (table[mid * kTableCols + 3] <= block) lo = mid; else hi = mid - 1;
  }
  const int64_t* row = table + lo * kTableCols;
  ema_t* ema = reinterpret_cast<ema_t*>(row[0]);
  const param_t* param = reinterpret_cast<const param_t*>(row[1]);
  const int64_t numel = row[2];
  const int64_t begin = (block - row[3]) * kChunk;
  const int64_t end = min(begin + kChunk, numel);
  const acc_t w = acc_t(1) - *decay;

  const bool aligned = reinterpret_cast<uintptr_t>(ema) % sizeof(Vec<ema_t, kVec>) == 0 &&
                       reinterpret_cast<uintptr_t>(param) % sizeof(Vec<param_t, kVec>) == 0;
  int64_t scalar_from = begin;
  if (aligned) {
    constexpr int kIters = kChunk / (kThreads * kVec);
    if (end - begin == kChunk) {
      // Full chunk: issue every load before any math so that they overlap.
      Vec<ema_t, kVec> e[kIters];
      Vec<param_t, kVec> p[kIters];
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int64_t i = begin + (int64_t(it) * kThreads + threadIdx.x) * kVec;
        e[it] = *reinterpret_cast<const Vec<ema_t, kVec>*>(ema + i);
        p[it] = *reinterpret_cast<const Vec<param_t, kVec>*>(param + i);
      }
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          const acc_t x = static_cast<acc_t>(e[it].val[v]);
          e[it].val[v] = static_cast<ema_t>(x + w * (static_cast<acc_t>(p[it].val[v]) - x));
        }
        const int64_t i = begin + (int64_t(it) * kThreads + threadIdx.x) * kVec;
        *reinterpret_cast<Vec<ema_t, kVec>*>(ema + i) = e[it];
      }
      return;
    }
    // Last, partial chunk: whole vectors first, the remainder below.
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t i = begin + int64_t(threadIdx.x) * kVec; i < vec_end; i += int64_t(kThreads) * kVec) {
      Vec<ema_t, kVec> e = *reinterpret_cast<const Vec<ema_t, kVec>*>(ema + i);
      const Vec<param_t, kVec> p = *reinterpret_cast<const Vec<param_t, kVec>*>(param + i);
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const acc_t x = static_cast<acc_t>(e.val[v]);
        e.val[v] = static_cast<ema_t>(x + w * (static_cast<acc_t>(p.val[v]) - x));
      }
      *reinterpret_cast<Vec<ema_t, kVec>*>(ema + i) = e;
    }
    scalar_from = vec_end;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += kThreads) {
    const acc_t x = static_cast<acc_t>(ema[i]);
    ema[i] = static_cast<ema_t>(x + w * (static_cast<acc_t>(param[i]) - x));
  }
}

template <typename ema_t, typename param_t, typename Launch>
void launch_group(const std::vector<FlatPair>& pairs, const at::Tensor& decay_any, const Launch& launch) {
  using acc_t = at::opmath_type<ema_t>;
  const at::Tensor decay = decay_any.to(c10::CppTypeToScalarType<acc_t>::value);  // no-op when it matches
  // Build the table in pinned memory; the async copy keeps the host from waiting.
  const int64_t n = static_cast<int64_t>(pairs.size());
  at::Tensor host = at::empty({n, kTableCols}, at::TensorOptions(at::kLong).pinned_memory(decay.is_cuda()));
  int64_t* t = host.data_ptr<int64_t>();
  int64_t blocks = 0;
  for (int64_t i = 0; i < n; ++i) {
    t[i * kTableCols + 0] = reinterpret_cast<int64_t>(pairs[i].ema.data_ptr());
    t[i * kTableCols + 1] = reinterpret_cast<int64_t>(pairs[i].param.const_data_ptr());
    t[i * kTableCols + 2] = pairs[i].ema.numel();
    t[i * kTableCols + 3] = blocks;
    blocks += (pairs[i].ema.numel() + kChunk - 1) / kChunk;
  }
  TORCH_CHECK(blocks < (int64_t(1) << 31), "ema_update_: too many elements for one launch");
  const at::Tensor table = host.to(decay.device(), /*non_blocking=*/true);
  constexpr int kVec = 16 / sizeof(ema_t);  // 16-byte loads of the EMA
  launch(&ema_multi_tensor_kernel<ema_t, param_t, kVec>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads),
         table.const_data_ptr<int64_t>(), n, decay.const_data_ptr<acc_t>());
}

// Every (EMA dtype, tensor dtype) group of the lists in one launch each.
template <typename Launch>
void update_gpu(at::TensorList ema, at::TensorList params, const at::Tensor& decay, const Launch& launch) {
  const at::Tensor d = decay.to(ema[0].device());
  for_each_dtype_group(ema, params, [&](const std::vector<FlatPair>& pairs, auto e_tag, auto p_tag) {
    launch_group<typename decltype(e_tag)::type, typename decltype(p_tag)::type>(pairs, d, launch);
  });
}

}  // namespace ema_kernels
}  // namespace madfast
