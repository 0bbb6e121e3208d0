// The CUDA kernels of madfast::kl_div_fwd / kl_div_bwd and l1_fwd / l1_bwd (csrc/logit_losses.h),
// and their host side (`launch` is supplied by the includer: csrc/cuda/logit_losses.cu, or the CPU
// emulator in tests/cuda_emulator).
// Forward: a group of kGroup threads per row (8 or 32 threads, several rows per block, for small C;
// the whole block for large C) reads s and t once with 16-byte loads, online softmax in acc_t
// (fp32; fp64 only for fp64), and writes the row statistics; a one-block second stage sums the rows
// in a fixed order into the reduced, bounded loss (deterministic, no atomics, no host sync).
// Backward: the same row groups, columns also split over blocks, both gradients written once.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../logit_losses.h"
#include "block_reduce.cuh"

namespace madfast {
namespace logit_kernels {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kBackwardBlocks = 1024;  // columns are split until about this many blocks

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t>
constexpr int vec_of() {
  return 16 / int(sizeof(scalar_t));
}

// Element offset of p modulo N: rows whose pointers agree on it share one vector alignment.
template <int N, typename T>
__device__ __forceinline__ int misalign(const T* p) {
  return int((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % N);
}

// Calls f(c, xa, xb, n) over the columns [c0, c1) of rows a and b, spread over kGroup lanes: n
// elements from column c on (n = kVec for an aligned pack, 1 for the scalar head and tail).
// vec: a, b (and whatever f writes) share one alignment, so packs of kVec can be loaded.
template <int kGroup, int kVec, typename scalar_t, typename F>
__device__ __forceinline__ void for_row(const scalar_t* a, const scalar_t* b, int64_t c0, int64_t c1, int lane,
                                        bool vec, F&& f) {
  scalar_t xa[kVec], xb[kVec];
  int64_t body = c0, packs = 0;
  if (vec && kVec > 1) {
    const int mis = misalign<kVec>(a + c0);
    body = std::min(c1, c0 + (mis ? kVec - mis : 0));
    packs = (c1 - body) / kVec;
    for (int64_t p = lane; p < packs; p += kGroup) {
      const int64_t c = body + p * kVec;
      const Pack<scalar_t, kVec> pa = *reinterpret_cast<const Pack<scalar_t, kVec>*>(a + c);
      const Pack<scalar_t, kVec> pb = *reinterpret_cast<const Pack<scalar_t, kVec>*>(b + c);
#pragma unroll
      for (int j = 0; j < kVec; ++j) xa[j] = pa.v[j], xb[j] = pb.v[j];
      f(c, xa, xb, kVec);
    }
    if (lane < body - c0) {  // head: fewer than kVec columns
      xa[0] = a[c0 + lane], xb[0] = b[c0 + lane];
      f(c0 + lane, xa, xb, 1);
    }
    for (int64_t c = body + packs * kVec + lane; c < c1; c += kGroup) {  // tail
      xa[0] = a[c], xb[0] = b[c];
      f(c, xa, xb, 1);
    }
  } else {
    for (int64_t c = c0 + lane; c < c1; c += kGroup) {
      xa[0] = a[c], xb[0] = b[c];
      f(c, xa, xb, 1);
    }
  }
}

template <typename T>
__device__ __forceinline__ T shfl(T v, int offset) {
  return __shfl_xor_sync(0xffffffff, v, offset);
}

// Combines per-thread values over the group of kGroup threads: warp shuffles, then for a whole-block
// group the warps' values in shared memory, merged in a fixed order. Every thread of the block must
// call it (no thread may have returned); every thread of a group returns with the result.
template <int kGroup, typename V, typename Merge>
__device__ __forceinline__ V group_reduce(V v, Merge merge) {
  constexpr int kInWarp = kGroup < kWarp ? kGroup : kWarp;
#pragma unroll
  for (int offset = kInWarp / 2; offset > 0; offset /= 2) merge(v, v.shuffled(offset));
  if constexpr (kGroup > kWarp) {
    static_assert(kGroup == kThreads, "a group is at most a warp, or the whole block");
    __shared__ V warps[kThreads / kWarp];
    if (threadIdx.x % kWarp == 0) warps[threadIdx.x / kWarp] = v;
    __syncthreads();
    v = warps[0];
    for (int w = 1; w < kThreads / kWarp; ++w) merge(v, warps[w]);
  }
  return v;
}

template <typename acc_t>
struct KlShuffle : KlState<acc_t> {
  __device__ KlShuffle shuffled(int offset) const {
    KlShuffle o;
    o.ms = shfl(this->ms, offset), o.ss = shfl(this->ss, offset), o.mt = shfl(this->mt, offset);
    o.st = shfl(this->st, offset), o.w = shfl(this->w, offset);
    return o;
  }
};

template <typename acc_t>
struct SumShuffle {
  acc_t v;
  __device__ SumShuffle shuffled(int offset) const { return {shfl(v, offset)}; }
};

template <typename scalar_t, int kGroup, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    kl_fwd_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t B, int64_t C,
                  int64_t s_stride, int64_t t_stride, acc_t inv_tau, acc_t tau_sq, acc_t* __restrict__ stats,
                  scalar_t* __restrict__ rows_out) {
  constexpr int kRows = kThreads / kGroup, kVec = vec_of<scalar_t>();
  const int lane = threadIdx.x % kGroup;
  const int64_t row = int64_t(blockIdx.x) * kRows + threadIdx.x / kGroup;
  const int64_t r = row < B ? row : B - 1;  // past B: re-read row B-1, store nothing (no early return before shuffles)
  const scalar_t* srow = s + r * s_stride;
  const scalar_t* trow = t + r * t_stride;
  KlShuffle<acc_t> st;
  static_cast<KlState<acc_t>&>(st) = KlState<acc_t>::empty();
  for_row<kGroup, kVec>(srow, trow, 0, C, lane, misalign<kVec>(srow) == misalign<kVec>(trow),
                        [&](int64_t, const scalar_t* xs, const scalar_t* xt, int n) {
                          acc_t as[kVec], at_[kVec], ms = st.ms, mt = st.mt;
                          for (int j = 0; j < n; ++j) {
                            as[j] = acc_t(xs[j]) * inv_tau, at_[j] = acc_t(xt[j]) * inv_tau;
                            ms = ms > as[j] ? ms : as[j], mt = mt > at_[j] ? mt : at_[j];
                          }
                          if (ms > st.ms || mt > st.mt) st.rescale(ms, mt);  // once per pack
                          for (int j = 0; j < n; ++j) st.add(as[j], at_[j]);
                        });
  st = group_reduce<kGroup>(st, [](KlShuffle<acc_t>& a, const KlShuffle<acc_t>& b) { a.merge(b); });
  if (lane == 0 && row < B) {
    const acc_t kl = st.kl();
    stats[kMaxS * B + row] = st.ms, stats[kLogS * B + row] = std::log(st.ss);
    stats[kMaxT * B + row] = st.mt, stats[kLogT * B + row] = std::log(st.st);
    stats[kKl * B + row] = kl;
    if (rows_out) rows_out[row] = static_cast<scalar_t>(kl * tau_sq);
  }
}

template <typename scalar_t, int kGroup, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    l1_fwd_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t B, int64_t C,
                  int64_t s_stride, int64_t t_stride, acc_t* __restrict__ rows_acc, scalar_t* __restrict__ rows_out) {
  constexpr int kRows = kThreads / kGroup, kVec = vec_of<scalar_t>();
  const int lane = threadIdx.x % kGroup;
  const int64_t row = int64_t(blockIdx.x) * kRows + threadIdx.x / kGroup;
  const int64_t r = row < B ? row : B - 1;
  const scalar_t* srow = s + r * s_stride;
  const scalar_t* trow = t + r * t_stride;
  SumShuffle<acc_t> sum{acc_t(0)};
  for_row<kGroup, kVec>(srow, trow, 0, C, lane, misalign<kVec>(srow) == misalign<kVec>(trow),
                        [&](int64_t, const scalar_t* xs, const scalar_t* xt, int n) {
                          for (int j = 0; j < n; ++j) sum.v += std::abs(acc_t(xs[j]) - acc_t(xt[j]));
                        });
  sum = group_reduce<kGroup>(sum, [](SumShuffle<acc_t>& a, const SumShuffle<acc_t>& b) { a.v += b.v; });
  if (lane == 0 && row < B) {
    rows_acc[row] = sum.v;
    if (rows_out) rows_out[row] = static_cast<scalar_t>(sum.v);
  }
}

// The second stage: D = scale * sum of the B row values (one block, fixed order), loss = sign min(D, bound).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(const acc_t* __restrict__ rows, int64_t B, acc_t scale, acc_t sign, bool has_bound, acc_t bound,
                  acc_t* __restrict__ total, scalar_t* __restrict__ loss) {
  acc_t a = 0, unused = 0;
  for (int64_t i = threadIdx.x; i < B; i += kThreads) a += rows[i];
  block_sum2<kThreads>(a, unused);
  if (threadIdx.x == 0) {
    const acc_t d = a * scale;
    *total = d;
    *loss = static_cast<scalar_t>(bounded(d, has_bound, bound, sign));
  }
}

// Scalars of the backward: grad_output times the reduction's chain rule and the bound, on the device.
template <typename scalar_t, typename acc_t>
struct GradScale {
  const scalar_t* grad;
  int64_t g_stride;
  const acc_t* total;  // D (reduced losses)
  bool reduced, has_bound;
  acc_t factor, sign, bound;

  __device__ acc_t row(int64_t r) const {
    const acc_t g = acc_t(grad[r * g_stride]);
    return reduced ? g * factor * bounded_grad(*total, has_bound, bound, sign) : g;
  }
};

template <typename scalar_t, int kGroup, bool kIsKl, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t B, int64_t C,
               int64_t s_stride, int64_t t_stride, int64_t col_blocks, const acc_t* __restrict__ stats,
               GradScale<scalar_t, acc_t> scale, acc_t inv_tau, acc_t tau, scalar_t* __restrict__ gs,
               scalar_t* __restrict__ gt) {
  constexpr int kRows = kThreads / kGroup, kVec = vec_of<scalar_t>();
  const int64_t rb = blockIdx.x / col_blocks, cb = blockIdx.x - rb * col_blocks;  // one division per thread
  const int64_t row = rb * kRows + threadIdx.x / kGroup;
  if (row >= B) return;  // nothing below synchronizes
  const int lane = threadIdx.x % kGroup;
  const int64_t span = (C + col_blocks - 1) / col_blocks, c0 = std::min(C, cb * span), c1 = std::min(C, c0 + span);
  const scalar_t* srow = s + row * s_stride;
  const scalar_t* trow = t + row * t_stride;
  scalar_t* gsrow = gs ? gs + row * C : nullptr;
  scalar_t* gtrow = gt ? gt + row * C : nullptr;
  const int mis = misalign<kVec>(srow);
  const bool vec = mis == misalign<kVec>(trow) && (!gsrow || mis == misalign<kVec>(gsrow)) &&
                   (!gtrow || mis == misalign<kVec>(gtrow));
  acc_t g = scale.row(row), st[kKlStats] = {};
  if constexpr (kIsKl) {
    g *= tau;
    for (int k = 0; k < kKlStats; ++k) st[k] = stats[k * B + row];
  }
  for_row<kGroup, kVec>(srow, trow, c0, c1, lane, vec, [&](int64_t c, const scalar_t* xs, const scalar_t* xt, int n) {
    Pack<scalar_t, kVec> ps, pt;
    for (int j = 0; j < n; ++j) {
      acc_t a, b;
      if constexpr (kIsKl) {
        kl_grads(acc_t(xs[j]) * inv_tau, acc_t(xt[j]) * inv_tau, st[kMaxS], st[kLogS], st[kMaxT], st[kLogT], st[kKl],
                 g, a, b);
      } else {
        const acc_t d = acc_t(xs[j]) - acc_t(xt[j]);
        a = g * acc_t((d > 0) - (d < 0)), b = -a;
      }
      ps.v[j] = static_cast<scalar_t>(a), pt.v[j] = static_cast<scalar_t>(b);
    }
    if (n == kVec) {
      if (gsrow) *reinterpret_cast<Pack<scalar_t, kVec>*>(gsrow + c) = ps;
      if (gtrow) *reinterpret_cast<Pack<scalar_t, kVec>*>(gtrow + c) = pt;
    } else {
      for (int j = 0; j < n; ++j) {
        if (gsrow) gsrow[c + j] = ps.v[j];
        if (gtrow) gtrow[c + j] = pt.v[j];
      }
    }
  });
}

// ---- host side ----

// Threads per row: 8 (32 rows a block) for C <= 128, a warp (8 rows) for C <= 2048, else the block.
template <typename Fn8, typename Fn32, typename FnBlock>
void by_group(int64_t C, Fn8 f8, Fn32 f32, FnBlock fb) {
  if (C <= 128) f8();
  else if (C <= 2048) f32();
  else fb();
}

inline unsigned row_blocks(int64_t B, int group) {
  const int64_t rows = kThreads / group;
  return static_cast<unsigned>((B + rows - 1) / rows);
}

template <typename Launch>
void reduce_second_stage(const LogitLossArgs& a, const at::Tensor& rows, double scale, at::Tensor& loss,
                         at::Tensor& total, const Launch& launch) {
  if (!a.reduced()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.s.scalar_type(), "logit_loss_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(&reduce_kernel<scalar_t>, dim3(1), dim3(kThreads), rows.const_data_ptr<acc_t>(), a.B,
           acc_t(scale * a.factor), acc_t(a.sign), a.bound.has_value(), acc_t(a.bound.value_or(0)),
           total.data_ptr<acc_t>(), loss.data_ptr<scalar_t>());
  });
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_fwd_gpu(const at::Tensor& student, const at::Tensor& teacher,
                                                              double temperature, c10::string_view reduction,
                                                              double sign, std::optional<double> bound,
                                                              const Launch& launch) {
  const LogitLossArgs a(student, teacher, temperature, reduction, sign, bound, "kl_div_fwd");
  at::Tensor loss = a.new_loss(), total = a.new_total();
  at::Tensor stats = at::empty({kKlStats, a.B}, a.s.options().dtype(a.acc()));
  if (a.B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.s.scalar_type(), "kl_div_fwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto go = [&](auto kernel, int group) {
        launch(kernel, dim3(row_blocks(a.B, group)), dim3(kThreads), a.s.const_data_ptr<scalar_t>(),
               a.t.const_data_ptr<scalar_t>(), a.B, a.C, a.s.stride(0), a.t.stride(0), acc_t(1.0 / temperature),
               acc_t(temperature * temperature), stats.data_ptr<acc_t>(),
               a.reduced() ? nullptr : loss.data_ptr<scalar_t>());
      };
      by_group(a.C, [&] { go(&kl_fwd_kernel<scalar_t, 8>, 8); }, [&] { go(&kl_fwd_kernel<scalar_t, 32>, 32); },
               [&] { go(&kl_fwd_kernel<scalar_t, kThreads>, kThreads); });
    });
  }
  reduce_second_stage(a, stats.select(0, kKl), temperature * temperature, loss, total, launch);
  return {loss, stats, total};
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> l1_fwd_gpu(const at::Tensor& student, const at::Tensor& teacher,
                                              c10::string_view reduction, double sign, std::optional<double> bound,
                                              const Launch& launch) {
  const LogitLossArgs a(student, teacher, 1.0, reduction, sign, bound, "l1_fwd");
  at::Tensor loss = a.new_loss(), total = a.new_total();
  at::Tensor rows = at::empty({a.B}, a.s.options().dtype(a.acc()));
  if (a.B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.s.scalar_type(), "l1_fwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto go = [&](auto kernel, int group) {
        launch(kernel, dim3(row_blocks(a.B, group)), dim3(kThreads), a.s.const_data_ptr<scalar_t>(),
               a.t.const_data_ptr<scalar_t>(), a.B, a.C, a.s.stride(0), a.t.stride(0), rows.data_ptr<acc_t>(),
               a.reduced() ? nullptr : loss.data_ptr<scalar_t>());
      };
      by_group(a.C, [&] { go(&l1_fwd_kernel<scalar_t, 8>, 8); }, [&] { go(&l1_fwd_kernel<scalar_t, 32>, 32); },
               [&] { go(&l1_fwd_kernel<scalar_t, kThreads>, kThreads); });
    });
  }
  reduce_second_stage(a, rows, 1.0, loss, total, launch);
  return {loss, total};
}

template <bool kIsKl, typename Launch>
std::tuple<at::Tensor, at::Tensor> bwd_gpu(const at::Tensor& grad, const LogitLossArgs& a, const at::Tensor* stats,
                                           const at::Tensor& total, bool grad_s, bool grad_t, const char* op,
                                           const Launch& launch) {
  at::Tensor gs = a.new_grad(grad_s), gt = a.new_grad(grad_t);
  if (a.B == 0 || a.C == 0 || !(grad_s || grad_t)) return {gs, gt};
  const at::Tensor g = grad.to(a.s.scalar_type());  // may change the strides: read them after
  const int64_t g_stride = grad_stride(g, a, op);
  check_total(total, a, op);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.s.scalar_type(), "logit_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GradScale<scalar_t, acc_t> scale{g.const_data_ptr<scalar_t>(), g_stride,
                                           a.reduced() ? total.const_data_ptr<acc_t>() : nullptr,
                                           a.reduced(), a.bound.has_value(), acc_t(a.factor), acc_t(a.sign),
                                           acc_t(a.bound.value_or(0))};
    auto go = [&](auto kernel, int group) {
      const int64_t rbs = row_blocks(a.B, group), per_block = int64_t(group) * vec_of<scalar_t>();
      const int64_t col_blocks = std::max<int64_t>(
          1, std::min((a.C + per_block - 1) / per_block, (kBackwardBlocks + rbs - 1) / rbs));
      launch(kernel, dim3(static_cast<unsigned>(rbs * col_blocks)), dim3(kThreads), a.s.const_data_ptr<scalar_t>(),
             a.t.const_data_ptr<scalar_t>(), a.B, a.C, a.s.stride(0), a.t.stride(0), col_blocks,
             stats ? stats->const_data_ptr<acc_t>() : nullptr, scale, acc_t(1.0 / a.temperature),
             acc_t(a.temperature), grad_s ? gs.data_ptr<scalar_t>() : nullptr,
             grad_t ? gt.data_ptr<scalar_t>() : nullptr);
    };
    by_group(a.C, [&] { go(&bwd_kernel<scalar_t, 8, kIsKl>, 8); }, [&] { go(&bwd_kernel<scalar_t, 32, kIsKl>, 32); },
             [&] { go(&bwd_kernel<scalar_t, kThreads, kIsKl>, kThreads); });
  });
  return {gs, gt};
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> kl_div_bwd_gpu(const at::Tensor& grad, const at::Tensor& student,
                                                  const at::Tensor& teacher, const at::Tensor& stats,
                                                  const at::Tensor& total, double temperature,
                                                  c10::string_view reduction, double sign, std::optional<double> bound,
                                                  bool grad_s, bool grad_t, const Launch& launch) {
  const LogitLossArgs a(student, teacher, temperature, reduction, sign, bound, "kl_div_bwd");
  check_kl_stats(stats, a, "kl_div_bwd");
  return bwd_gpu<true>(grad, a, &stats, total, grad_s, grad_t, "kl_div_bwd", launch);
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> l1_bwd_gpu(const at::Tensor& grad, const at::Tensor& student,
                                              const at::Tensor& teacher, const at::Tensor& total,
                                              c10::string_view reduction, double sign, std::optional<double> bound,
                                              bool grad_s, bool grad_t, const Launch& launch) {
  const LogitLossArgs a(student, teacher, 1.0, reduction, sign, bound, "l1_bwd");
  return bwd_gpu<false>(grad, a, nullptr, total, grad_s, grad_t, "l1_bwd", launch);
}

}  // namespace logit_kernels
}  // namespace madfast
