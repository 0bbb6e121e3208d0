// The CUDA kernels of madfast::bn_stat_losses (DeepInversion's BN loss of every layer of a teacher in
// one call) and its backward, with their host side (`launch` is supplied by the includer:
// csrc/cuda/bn_stat_losses.cu, or the CPU emulator in tests/cuda_emulator).
//
// Work split. A layer's input x (N, C, H, W) is read as rows (n, hw) x channels. A block takes
// `lanes` channels (1 for NCHW, where the H*W run of a channel is contiguous; 32 for channels_last,
// where a position's channels are) and one of `splits` contiguous row ranges, so that a 64-channel
// stem layer still spreads over thousands of blocks. Consecutive threads read consecutive addresses
// in both layouts, and no thread divides per element. The layers travel in the kernel's
// arguments (up to kMaxLayers per launch, by value: nothing to copy per call, safe in CUDA graphs).
//
// Forward, 3 launches for any number of layers (more only past kMaxLayers per dtype):
//   1. partials: each thread sums x - pivot and (x - pivot)^2 over its rows (pivot: the channel's
//      value at (n, hw) = 0, the same for all its threads and blocks, so that neither the sums nor
//      the merges of partial means carry |mean| when |mean| >> std), in fp32 (fp64 for fp64); the
//      block merges its threads' (count, mean - pivot, M2) with Chan's formula in a fixed tree order
//      into one partial per channel, and writes the pivot beside it;
//   2. finalize: a block per layer merges each channel's partials in split order, adds the pivot back,
//      writes the moments, and reduces (mean - running_mean)^2 and (var - running_var)^2 over
//      channels into the norms;
//   3. loss: the layers' norms summed in layer order on the device (no host sync).
// Backward, one launch: the forward's block split, each thread's channel fixed, so its coefficients
// grad_x = a_c + b_c (x - mean_c) are computed once; the upstream gradient is read on the device.
// No atomics anywhere: the results do not depend on scheduling.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../channel_moments.h"
#include "block_reduce.cuh"

namespace madfast {
namespace bn_losses {

constexpr int kThreads = 256;
constexpr int kMaxLayers = 24;     // per launch: 24 x 136 B of layer table within the 4 KiB argument limit
constexpr int64_t kMaxSplits = 64;  // partials per channel (the finalize merges them in order)
constexpr int64_t kRowsPerThread = 16;  // minimum work per thread before a channel is split further

struct Layer {
  const void* x;
  void* grad_x;              // backward output (same strides as x)
  const void* running_mean;  // acc dtype, contiguous
  const void* running_var;
  int64_t N, HW, C, sN, sC, sHW;
  int64_t lanes;        // channels per block: 1 (NCHW) or 32 (channels_last)
  int64_t splits;       // row ranges per channel group
  int64_t first_block;  // of this layer in this launch's grid
  int64_t part;         // first partial of this layer in the workspace (channel-major, then split)
  int64_t col;          // first column of this layer in moments (2, total_c)
  int64_t index;        // position in the call's layer list (its norms)
};

struct Table {
  Layer layer[kMaxLayers];
  int count;
};
static_assert(sizeof(Table) + 64 <= 4096, "a kernel's arguments are limited to 4 KiB");

template <typename acc_t>
struct Stats {
  acc_t n, mean, m2;
};

// Chan et al.: the moments of the union of two disjoint sets, as in csrc/channel_moments.cpp.
template <typename acc_t>
__device__ __forceinline__ Stats<acc_t> merge(Stats<acc_t> a, const Stats<acc_t>& b) {
  if (b.n == acc_t(0)) return a;
  if (a.n == acc_t(0)) return b;
  const acc_t n = a.n + b.n, fb = b.n / n, d = b.mean - a.mean;
  return {n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.n * fb};
}

__device__ __forceinline__ int find_layer(const Table& t) {
  int l = 0;
  while (l + 1 < t.count && int64_t(blockIdx.x) >= t.layer[l + 1].first_block) ++l;
  return l;
}

// This thread's channel and row range in a block of the layer (forward and backward share it).
struct Slice {
  int64_t c, row, end, step;  // rows row, row + step, ... < end
  int64_t split;              // the block's row range
  bool active;
};

__device__ __forceinline__ Slice slice_of(const Layer& L) {
  const int64_t local = int64_t(blockIdx.x) - L.first_block;
  const int64_t group = local / L.splits, split = local - group * L.splits;
  const int64_t lane = threadIdx.x % L.lanes, rows_per_block = kThreads / L.lanes;
  const int64_t M = L.N * L.HW, per = (M + L.splits - 1) / L.splits;
  const int64_t lo = split * per, hi = std::min(M, lo + per);
  const int64_t c = group * L.lanes + lane;
  return {c, lo + threadIdx.x / L.lanes, hi, rows_per_block, split, c < L.C};
}

// The (n, hw) of a slice's rows, advanced by its step without a division per element.
struct RowWalk {
  int64_t n, hw, dn, dhw, HW;

  __device__ __forceinline__ int64_t offset(const Layer& L) const { return n * L.sN + hw * L.sHW; }
  __device__ __forceinline__ void next() {
    n += dn;
    hw += dhw;
    if (hw >= HW) hw -= HW, ++n;
  }
};

__device__ __forceinline__ RowWalk walk(const Slice& s, const Layer& L) {
  const int64_t n = s.row / L.HW, dn = s.step / L.HW;
  return {n, s.row - n * L.HW, dn, s.step - dn * L.HW, L.HW};
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) partials_kernel(Table table, acc_t* __restrict__ part,
                                                            int64_t part_stride) {
  const Layer& L = table.layer[find_layer(table)];
  const Slice s = slice_of(L);
  const scalar_t* x = static_cast<const scalar_t*>(L.x) + s.c * L.sC;
  const acc_t pivot = s.active && L.N * L.HW > 0 ? acc_t(x[0]) : acc_t(0);  // the channel's first value
  Stats<acc_t> mine{0, 0, 0};
  if (s.active && s.row < s.end) {
    RowWalk w = walk(s, L);
    acc_t s1 = 0, s2 = 0, count = 0;
    for (int64_t r = s.row; r < s.end; r += s.step, w.next()) {
      const acc_t d = acc_t(x[w.offset(L)]) - pivot;
      s1 += d;
      s2 += d * d;
      count += acc_t(1);
    }
    const acc_t m = s1 / count;
    mine = {count, m, std::max(acc_t(0), s2 - s1 * m)};  // the mean less the pivot
  }
  // merge the block's row groups channel by channel (lanes apart), a fixed tree
  __shared__ acc_t sn[kThreads], smean[kThreads], sm2[kThreads];
  const int t = threadIdx.x;
  sn[t] = mine.n, smean[t] = mine.mean, sm2[t] = mine.m2;
  __syncthreads();
  for (int64_t stride = kThreads / 2; stride >= L.lanes; stride /= 2) {
    if (t < stride) {
      const Stats<acc_t> m = merge(Stats<acc_t>{sn[t], smean[t], sm2[t]}, Stats<acc_t>{sn[t + stride], smean[t + stride], sm2[t + stride]});
      sn[t] = m.n, smean[t] = m.mean, sm2[t] = m.m2;
    }
    __syncthreads();
  }
  if (t < L.lanes && s.active) {
    const int64_t at = L.part + s.c * L.splits + s.split;
    part[at] = sn[t];
    part[part_stride + at] = smean[t];
    part[2 * part_stride + at] = sm2[t];
    part[3 * part_stride + at] = pivot;
  }
}

// One block per layer: moments, and (with norms) the two squared distances to the running statistics.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) finalize_kernel(Table table, const acc_t* __restrict__ part,
                                                            int64_t part_stride, acc_t* __restrict__ mean_out,
                                                            acc_t* __restrict__ var_out, acc_t* __restrict__ norms,
                                                            int64_t layers) {
  const Layer& L = table.layer[blockIdx.x];
  const acc_t* rm = static_cast<const acc_t*>(L.running_mean);
  const acc_t* rv = static_cast<const acc_t*>(L.running_var);
  acc_t sm = 0, sv = 0;
  for (int64_t c = threadIdx.x; c < L.C; c += kThreads) {
    Stats<acc_t> m{0, 0, 0};
    for (int64_t k = 0; k < L.splits; ++k) {
      const int64_t at = L.part + c * L.splits + k;
      m = merge(m, Stats<acc_t>{part[at], part[part_stride + at], part[2 * part_stride + at]});
    }
    const acc_t pivot = part[3 * part_stride + L.part + c * L.splits];
    const acc_t mean = m.n > acc_t(0) ? pivot + m.mean : acc_t(NAN), var = m.n > acc_t(0) ? m.m2 / m.n : acc_t(NAN);
    mean_out[L.col + c] = mean;
    var_out[L.col + c] = var;
    if (norms != nullptr) {
      sm += (mean - rm[c]) * (mean - rm[c]);
      sv += (var - rv[c]) * (var - rv[c]);
    }
  }
  if (norms == nullptr) return;  // the same for every thread of the grid
  block_sum2<kThreads>(sm, sv);
  if (threadIdx.x == 0) {
    norms[L.index] = std::sqrt(sm);
    norms[layers + L.index] = std::sqrt(sv);
  }
}

template <typename acc_t>
__global__ void loss_kernel(const acc_t* __restrict__ norms, int64_t layers, acc_t* __restrict__ loss) {
  if (threadIdx.x != 0) return;
  acc_t total = 0;
  for (int64_t l = 0; l < layers; ++l) total += norms[l] + norms[layers + l];  // the C++ kernel's order
  *loss = total;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(Table table, const acc_t* __restrict__ grad, const acc_t* __restrict__ moments, int64_t total_c,
                    const acc_t* __restrict__ norms, int64_t layers) {
  const Layer& L = table.layer[find_layer(table)];
  const Slice s = slice_of(L);
  if (!s.active || s.row >= s.end) return;
  // d||u||/du = u / ||u|| (0 at u = 0, as torch.linalg.vector_norm's backward)
  const acc_t g = *grad, nm = norms[L.index], nv = norms[layers + L.index], inv_m = acc_t(1) / acc_t(L.N * L.HW);
  const acc_t mean = moments[L.col + s.c], var = moments[total_c + L.col + s.c];
  const acc_t gm = nm > acc_t(0) ? g * (mean - static_cast<const acc_t*>(L.running_mean)[s.c]) / nm : acc_t(0);
  const acc_t gv = nv > acc_t(0) ? g * (var - static_cast<const acc_t*>(L.running_var)[s.c]) / nv : acc_t(0);
  using x_acc_t = at::opmath_type<scalar_t>;
  const x_acc_t a = x_acc_t(gm * inv_m), b = x_acc_t(acc_t(2) * gv * inv_m), mu = x_acc_t(mean);
  const scalar_t* x = static_cast<const scalar_t*>(L.x) + s.c * L.sC;
  scalar_t* out = static_cast<scalar_t*>(L.grad_x) + s.c * L.sC;
  RowWalk w = walk(s, L);
  for (int64_t r = s.row; r < s.end; r += s.step, w.next()) {
    const int64_t at = w.offset(L);
    out[at] = static_cast<scalar_t>(a + b * (x_acc_t(x[at]) - mu));
  }
}

// ---- host side ----

// The blocks of a layer: channel groups x row splits (enough splits to spread a layer with few
// channels, at least kRowsPerThread rows per thread).
inline void plan_layer(Layer& L, const ChannelView& v) {
  L.N = v.N, L.HW = v.HW, L.C = v.C, L.sN = v.sN, L.sC = v.sC, L.sHW = v.sHW;
  L.lanes = v.channels_last() ? 32 : 1;
  const int64_t rows_per_block = kThreads / L.lanes, M = v.N * v.HW;
  L.splits = std::max<int64_t>(1, std::min(kMaxSplits, M / (rows_per_block * kRowsPerThread)));
}

inline int64_t blocks_of(const Layer& L) { return (L.C + L.lanes - 1) / L.lanes * L.splits; }

// Calls fn(table, blocks) for the layers listed in `which`, kMaxLayers at a time, first_block set.
template <typename Fn>
void for_each_launch(std::vector<Layer>& all, const std::vector<int64_t>& which, const Fn& fn) {
  for (size_t i = 0; i < which.size(); i += kMaxLayers) {
    Table t{};
    int64_t blocks = 0;
    for (size_t j = i; j < std::min(which.size(), i + kMaxLayers); ++j) {
      Layer L = all[which[j]];
      L.first_block = blocks;
      blocks += blocks_of(L);
      t.layer[t.count++] = L;
    }
    if (blocks > 0) fn(t, blocks);
  }
}

struct Prepared {
  BnLayers layers;
  std::vector<Layer> table;
  std::vector<at::Tensor> keep;  // running statistics converted to the acc dtype
  int64_t parts = 0;

  Prepared(at::TensorList xs, at::TensorList rms, at::TensorList rvs, const char* op) : layers(xs, rms, rvs, op) {
    for (int64_t l = 0; l < layers.size(); ++l) {
      const ChannelView& v = layers.views[l];
      Layer L{};
      plan_layer(L, v);
      L.x = v.x.const_data_ptr();
      keep.push_back(rms[l].to(layers.acc).contiguous());
      keep.push_back(rvs[l].to(layers.acc).contiguous());
      L.running_mean = keep[keep.size() - 2].const_data_ptr();
      L.running_var = keep.back().const_data_ptr();
      L.part = parts, L.col = layers.offsets[l], L.index = l;
      parts += L.C * L.splits;
      table.push_back(L);
    }
  }

  // layer indices grouped by x's dtype (one kernel instantiation per group)
  std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> by_dtype() const {
    std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> groups;
    for (int64_t l = 0; l < layers.size(); ++l) {
      const auto t = layers.views[l].x.scalar_type();
      auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == t; });
      if (it == groups.end()) groups.push_back({t, {l}});
      else it->second.push_back(l);
    }
    return groups;
  }
};

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_gpu(at::TensorList xs, at::TensorList rms, at::TensorList rvs,
                                                           const Launch& launch) {
  Prepared p(xs, rms, rvs, "bn_stat_losses");
  const BnLayers& layers = p.layers;
  at::Tensor loss = at::empty({}, layers.options()), moments = at::empty({2, layers.total_c}, layers.options());
  at::Tensor norms = at::empty({2, layers.size()}, layers.options());
  at::Tensor part = at::empty({4, std::max<int64_t>(p.parts, 1)}, layers.options());
  AT_DISPATCH_FLOATING_TYPES(layers.acc, "bn_stat_losses_cuda", [&] {
    using acc_t = scalar_t;
    acc_t* part_ptr = part.data_ptr<acc_t>();
    for (auto& [dtype, which] : p.by_dtype()) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bn_stat_partials_cuda", [&] {
        // acc is fp64 whenever a layer is: fp64 data with fp32 accumulation is never launched, so
        // it is not instantiated either
        if constexpr (std::is_same_v<scalar_t, double> && !std::is_same_v<acc_t, double>) {
          TORCH_INTERNAL_ASSERT(false, "bn_stat_losses: fp64 input with fp32 accumulation");
        } else {
          for_each_launch(p.table, which, [&](const Table& t, int64_t blocks) {
            launch(&partials_kernel<scalar_t, acc_t>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), t, part_ptr,
                   part.size(1));
          });
        }
      });
    }
    for (size_t i = 0; i < p.table.size(); i += kMaxLayers) {  // every layer, C = 0 ones too (their norms)
      Table t{};
      for (size_t j = i; j < std::min(p.table.size(), i + kMaxLayers); ++j) t.layer[t.count++] = p.table[j];
      launch(&finalize_kernel<acc_t>, dim3(static_cast<unsigned>(t.count)), dim3(kThreads), t,
             static_cast<const acc_t*>(part_ptr), part.size(1), moments.data_ptr<acc_t>(),
             moments.data_ptr<acc_t>() + layers.total_c, norms.data_ptr<acc_t>(), layers.size());
    }
    launch(&loss_kernel<acc_t>, dim3(1), dim3(32), static_cast<const acc_t*>(norms.data_ptr<acc_t>()), layers.size(),
           loss.data_ptr<acc_t>());
  });
  return {loss, moments, norms};
}

// madfast::channel_moments on CUDA: the same split reduction for one tensor, no running statistics.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> moments_gpu(const ChannelView& v, const Launch& launch) {
  const auto acc = acc_type(v.x.scalar_type());
  at::Tensor mean = at::empty({v.C}, v.x.options().dtype(acc)), var = at::empty({v.C}, v.x.options().dtype(acc));
  if (v.C == 0) return {mean, var};
  Table t{};
  Layer& L = t.layer[t.count++];
  plan_layer(L, v);
  L.x = v.x.const_data_ptr();
  at::Tensor part = at::empty({4, L.C * L.splits}, v.x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "channel_moments_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(&partials_kernel<scalar_t, acc_t>, dim3(static_cast<unsigned>(blocks_of(L))), dim3(kThreads), t,
           part.data_ptr<acc_t>(), part.size(1));
    launch(&finalize_kernel<acc_t>, dim3(1), dim3(kThreads), t, static_cast<const acc_t*>(part.data_ptr<acc_t>()),
           part.size(1), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), static_cast<acc_t*>(nullptr), int64_t(1));
  });
  return {mean, var};
}

template <typename Launch>
std::vector<at::Tensor> backward_gpu(const at::Tensor& grad, at::TensorList xs, at::TensorList rms, at::TensorList rvs,
                                     const at::Tensor& moments, const at::Tensor& norms, const Launch& launch) {
  Prepared p(xs, rms, rvs, "bn_stat_losses_backward");
  const BnLayers& layers = p.layers;
  layers.check_saved(grad, moments, norms, "bn_stat_losses_backward");
  TORCH_CHECK_VALUE(grad.device() == layers.views[0].x.device(), "bn_stat_losses_backward: grad_loss is on ",
                    grad.device(), " but x is on ", layers.views[0].x.device());
  const at::Tensor g = grad.reshape({1}).to(layers.acc);  // stays on the device
  std::vector<at::Tensor> out;
  for (int64_t l = 0; l < layers.size(); ++l) {
    out.push_back(at::empty_like(layers.views[l].x));  // x's layout (contiguous or channels_last)
    p.table[l].grad_x = out.back().data_ptr();
  }
  AT_DISPATCH_FLOATING_TYPES(layers.acc, "bn_stat_losses_backward_cuda", [&] {
    using acc_t = scalar_t;
    for (auto& [dtype, which] : p.by_dtype()) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bn_stat_grad_cuda", [&] {
        for_each_launch(p.table, which, [&](const Table& t, int64_t blocks) {
          launch(&backward_kernel<scalar_t, acc_t>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), t,
                 g.const_data_ptr<acc_t>(), moments.const_data_ptr<acc_t>(), layers.total_c,
                 norms.const_data_ptr<acc_t>(), layers.size());
        });
      });
    }
  });
  return out;
}

}  // namespace bn_losses
}  // namespace madfast
