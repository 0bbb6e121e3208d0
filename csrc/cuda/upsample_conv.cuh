// The CUDA kernels of madfast::upsample_conv and its backward, and their host side (`launch` is
// supplied by the includer: csrc/cuda/upsample_conv.cu, or the CPU emulator in tests/cuda_emulator):
// conv3x3 of a bilinear x2 upsample without the up-sampled tensor. Three SIMT implicit GEMMs (fp32 FMA, fp64 for fp64; operands of
// every dtype are widened as they are loaded), each a 64 x 64 output tile per block of 256 threads,
// 4 x 4 per thread, stepping through the reduction 16 at a time in shared memory:
//   forward      y[m, co]  = Sum_k A[m, k] w[k, co], A gathered from x by upsample::upsampled;
//                Sum y and Sum y^2 per channel reduced in shared memory, then one atomic per channel;
//   grad weight  gw[co, k] = Sum_m grad_y[m, co] A[m, k], the m range split over blocks (atomics);
//   grad input   per tile of 8 x 4 input pixels, the 20 x 12 up-sampled gradient region is a GEMM
//                over (co, kh, kw) kept in shared memory, then the bilinear adjoint reads it.
// The per-element math is csrc/upsample_conv.h, tested on the CPU through the host twin
// (csrc/upsample_conv.cpp); the kernels themselves run on the CPU in tests/test_cuda_emulated.py,
// which compiles this header against a CUDA execution-model emulator (tests/cuda_emulator/). Written
// without a GPU to time them: untuned; the Triton kernels are the tensor-core path.
#pragma once

#include <ATen/Dispatch.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../upsample_conv.h"

namespace madfast {
namespace upsample {

constexpr int kTile = 64, kStep = 16, kThreads = 256, kMicro = 4;  // kTile = 16 threads x kMicro
static_assert(kTile == 16 * kMicro && kThreads == 16 * 16, "a 16 x 16 thread grid covers the tile");

// acc[i][j] += Sum_s a[s][row * kMicro + i] * b[s][col * kMicro + j] over one reduction step.
template <typename acc_t>
__device__ __forceinline__ void micro_gemm(const acc_t (&a)[kStep][kTile], const acc_t (&b)[kStep][kTile], int row,
                                           int col, acc_t (&acc)[kMicro][kMicro]) {
#pragma unroll
  for (int s = 0; s < kStep; ++s) {
    acc_t ra[kMicro], rb[kMicro];
#pragma unroll
    for (int i = 0; i < kMicro; ++i) ra[i] = a[s][row * kMicro + i];
#pragma unroll
    for (int j = 0; j < kMicro; ++j) rb[j] = b[s][col * kMicro + j];
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[i][j] += ra[i] * rb[j];
  }
}

// ---- forward --------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ wt /* (K, Cout) */,
                   scalar_t* __restrict__ y, int64_t syN, int64_t syC, int64_t syH, int64_t syW,
                   acc_t* __restrict__ total, acc_t* __restrict__ total_sq /* (Cout,) or null */, Geometry<acc_t> g) {
  __shared__ acc_t As[kStep][kTile], Bs[kStep][kTile], s1[kTile], s2[kTile];
  const int64_t M = g.N * g.OH * g.OW, K = g.Cin * 9;
  const int64_t m0 = int64_t(blockIdx.x) * kTile, c0 = int64_t(blockIdx.y) * kTile;
  const int col = threadIdx.x % 16, row = threadIdx.x / 16;  // col: channels, row: pixels
  acc_t acc[kMicro][kMicro] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kStep) {
    for (int i = threadIdx.x; i < kStep * kTile; i += kThreads) {
      const int s = i / kTile, t = i % kTile;  // consecutive threads: consecutive pixels / channels
      const int64_t k = k0 + s, m = m0 + t, c = c0 + t;
      acc_t a = 0;
      if (m < M && k < K) {
        const int64_t n = m / (g.OH * g.OW), oh = (m / g.OW) % g.OH, ow = m % g.OW;
        const int64_t ci = k / 9, kh = (k % 9) / 3, kw = k % 3;
        a = upsampled(x + n * g.sxN + ci * g.sxC, oh + kh - 1, ow + kw - 1, g);
      }
      As[s][t] = a;
      Bs[s][t] = (k < K && c < g.Cout) ? wt[k * g.Cout + c] : acc_t(0);
    }
    __syncthreads();
    micro_gemm(As, Bs, row, col, acc);
    __syncthreads();
  }
  const bool stats = total != nullptr;
  if (stats && threadIdx.x < kTile) s1[threadIdx.x] = s2[threadIdx.x] = 0;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kMicro; ++j) {
    const int64_t c = c0 + col * kMicro + j;
    if (c >= g.Cout) continue;
    acc_t p1 = 0, p2 = 0;
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int64_t m = m0 + row * kMicro + i;
      if (m >= M) continue;
      const int64_t n = m / (g.OH * g.OW), oh = (m / g.OW) % g.OH, ow = m % g.OW;
      const scalar_t v = static_cast<scalar_t>(acc[i][j]);
      y[n * syN + c * syC + oh * syH + ow * syW] = v;
      const acc_t vf = static_cast<acc_t>(v);  // BatchNorm's statistics of the stored (rounded) values
      p1 += vf;
      p2 += vf * vf;
    }
    if (stats) {
      atomicAdd(&s1[col * kMicro + j], p1);
      atomicAdd(&s2[col * kMicro + j], p2);
    }
  }
  __syncthreads();
  if (stats && threadIdx.x < kTile && c0 + threadIdx.x < g.Cout) {
    atomicAdd(&total[c0 + threadIdx.x], s1[threadIdx.x]);
    atomicAdd(&total_sq[c0 + threadIdx.x], s2[threadIdx.x]);
  }
}

// ---- host side: `launch(kernel, grid, block, args...)` runs a kernel on the current stream (or,
// in tests/cuda_emulator, on the CPU) ----------------------------------------------------------

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_gpu(const at::Tensor& x, const at::Tensor& weight, bool stats,
                                                           const Launch& launch) {
  at::Tensor y, total, total_sq;  // named, not structured bindings: the dispatch lambda captures them
  std::tie(y, total, total_sq) = forward_outputs(x, weight, stats);
  const int64_t Cout = weight.size(0), K = x.size(1) * 9;
  if (y.numel() == 0) return {y, total, total_sq};
  const at::Tensor wt = weight.reshape({Cout, K}).t().to(acc_type(x.scalar_type())).contiguous();
  const dim3 grid(static_cast<unsigned>((y.numel() / Cout + kTile - 1) / kTile),
                  static_cast<unsigned>((Cout + kTile - 1) / kTile));
  TORCH_CHECK(grid.y <= 65535, "upsample_conv: too many output channels (", Cout, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_conv_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(&forward_kernel<scalar_t, acc_t>, grid, dim3(kThreads), x.const_data_ptr<scalar_t>(), wt.const_data_ptr<acc_t>(), y.data_ptr<scalar_t>(), y.stride(0), y.stride(1),
        y.stride(2), y.stride(3), stats ? total.data_ptr<acc_t>() : nullptr,
        stats ? total_sq.data_ptr<acc_t>() : nullptr, geometry<acc_t>(x, Cout));
  });
  return {y, total, total_sq};
}

// ---- grad weight ----------------------------------------------------------------------------

// gw (Cout, K) += Sum over this block's m range of grad_y[m, co] A[m, k]. Non-deterministic in the
// last bits (atomics across the m split), as cuDNN's default weight gradient.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grad_weight_kernel(GradY<scalar_t, acc_t> gy, const scalar_t* __restrict__ x, acc_t* __restrict__ gw,
                       Geometry<acc_t> g, int64_t chunk) {
  __shared__ acc_t Gs[kStep][kTile], As[kStep][kTile];
  const int64_t M = g.N * g.OH * g.OW, K = g.Cin * 9;
  const int64_t k0 = int64_t(blockIdx.x) * kTile, c0 = int64_t(blockIdx.y) * kTile;
  const int64_t m_lo = int64_t(blockIdx.z) * chunk, m_hi = m_lo + chunk < M ? m_lo + chunk : M;
  const int col = threadIdx.x % 16, row = threadIdx.x / 16;  // col: taps, row: channels
  acc_t acc[kMicro][kMicro] = {};
  for (int64_t mb = m_lo; mb < m_hi; mb += kStep) {
    for (int i = threadIdx.x; i < kStep * kTile; i += kThreads) {
      const int s = i % kStep, t = i / kStep;  // consecutive threads: consecutive pixels
      const int64_t m = mb + s, c = c0 + t, k = k0 + t;
      acc_t gv = 0, a = 0;
      if (m < m_hi) {
        const int64_t n = m / (g.OH * g.OW), oh = (m / g.OW) % g.OH, ow = m % g.OW;
        if (c < g.Cout) gv = gy(n, c, oh, ow, g.OH, g.OW);
        if (k < K) {
          const int64_t ci = k / 9, kh = (k % 9) / 3, kw = k % 3;
          a = upsampled(x + n * g.sxN + ci * g.sxC, oh + kh - 1, ow + kw - 1, g);
        }
      }
      Gs[s][t] = gv;
      As[s][t] = a;
    }
    __syncthreads();
    micro_gemm(Gs, As, row, col, acc);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t c = c0 + row * kMicro + i;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t k = k0 + col * kMicro + j;
      if (c < g.Cout && k < K) atomicAdd(&gw[c * K + k], acc[i][j]);
    }
  }
}

// ---- grad input -----------------------------------------------------------------------------

constexpr int kTileH = 8, kTileW = 4, kChannels = 16;  // input pixels and channels per block
constexpr int kRegionH = 2 * kTileH + 4, kRegionW = 2 * kTileW + 4;  // up-sampled rows/cols that read them
constexpr int kRegion = kRegionH * kRegionW;
static_assert(kRegion % (kThreads / kChannels) == 0 && kStep * kChannels == kThreads, "thread mapping");

// grad_x[n, ci, h, w] for one tile of input pixels and kChannels channels: 1) the up-sampled
// gradient of the region, g_up[p, ci] = Sum_{co, kh, kw} grad_y[n, co, u + 1 - kh, v + 1 - kw] w[co, ci, kh, kw],
// a GEMM over (co, kh, kw) with each thread owning kRegion / 16 pixels of one channel; 2) the
// bilinear adjoint, grad_x[h, w] = Sum_{u, v} weight(u -> h) weight(v -> w) g_up[u, v].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grad_input_kernel(GradY<scalar_t, acc_t> gy, const acc_t* __restrict__ w2 /* (Cout*9, Cin) */,
                      scalar_t* __restrict__ gx, int64_t sgxN, int64_t sgxC, int64_t sgxH, int64_t sgxW,
                      Geometry<acc_t> g, int64_t tiles_h, int64_t tiles_w) {
  __shared__ acc_t Gs[kRegion][kStep];  // grad_y operand; reused for g_up[p][channel] after the GEMM
  __shared__ acc_t Ws[kStep][kChannels];
  static_assert(kStep == kChannels, "Gs doubles as the (kRegion, kChannels) g_up buffer");
  const int64_t tile = blockIdx.x, n = tile / (tiles_h * tiles_w);
  const int64_t h_lo = (tile / tiles_w) % tiles_h * kTileH, w_lo = tile % tiles_w * kTileW;
  const int64_t ci0 = int64_t(blockIdx.y) * kChannels;
  const int64_t u_lo = first_reader(h_lo), v_lo = first_reader(w_lo);
  const int64_t K2 = g.Cout * 9;
  constexpr int kPerThread = kRegion / (kThreads / kChannels);
  const int ch = threadIdx.x % kChannels, p_first = threadIdx.x / kChannels;  // pixels p_first + 16 j
  acc_t acc[kPerThread] = {};
  for (int64_t k0 = 0; k0 < K2; k0 += kStep) {
    for (int i = threadIdx.x; i < kRegion * kStep; i += kThreads) {
      const int p = i % kRegion, s = i / kRegion;  // consecutive threads: consecutive columns
      const int64_t u = u_lo + p / kRegionW, v = v_lo + p % kRegionW, k = k0 + s;
      const int64_t co = k / 9, kh = (k % 9) / 3, kw = k % 3;
      Gs[p][s] = (k < K2 && u < g.OH && v < g.OW) ? gy(n, co, u + 1 - kh, v + 1 - kw, g.OH, g.OW) : acc_t(0);
    }
    {
      const int s = threadIdx.x / kChannels, c = threadIdx.x % kChannels;
      const int64_t k = k0 + s, ci = ci0 + c;
      Ws[s][c] = (k < K2 && ci < g.Cin) ? w2[k * g.Cin + ci] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kStep; ++s) {
      const acc_t wv = Ws[s][ch];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) acc[j] += Gs[p_first + j * (kThreads / kChannels)][s] * wv;
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) Gs[p_first + j * (kThreads / kChannels)][ch] = acc[j];
  __syncthreads();
  for (int e = threadIdx.x; e < kTileH * kTileW * kChannels; e += kThreads) {
    const int c = e % kChannels, i = e / kChannels;
    const int64_t h = h_lo + i / kTileW, wi = w_lo + i % kTileW, ci = ci0 + c;
    if (h >= g.H || wi >= g.W || ci >= g.Cin) continue;
    acc_t sum = 0;
    for (int64_t u = first_reader(h); u <= last_reader(h, g.OH); ++u) {
      const acc_t wu = tap_weight(u, h, g.scale_h, g.H);
      if (wu == acc_t(0)) continue;
      for (int64_t v = first_reader(wi); v <= last_reader(wi, g.OW); ++v) {
        const acc_t wv = tap_weight(v, wi, g.scale_w, g.W);
        if (wv != acc_t(0)) sum += wu * wv * Gs[(u - u_lo) * kRegionW + (v - v_lo)][c];
      }
    }
    gx[n * sgxN + ci * sgxC + h * sgxH + wi * sgxW] = static_cast<scalar_t>(sum);
  }
}

// sm_count: the GPU's multiprocessors, which the weight gradient's split of m is sized for.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> backward_gpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& y,
                                                const std::optional<at::Tensor>& grad_sum,
                                                const std::optional<at::Tensor>& grad_sumsq, bool grad_input,
                                                bool grad_weight, const Launch& launch, int64_t sm_count) {
  const GradYArgs args(grad_y, x, weight, y, grad_sum, grad_sumsq);
  const int64_t Cout = weight.size(0), Cin = x.size(1), K = Cin * 9, H = x.size(2), W = x.size(3);
  const auto acc = acc_type(x.scalar_type());
  at::Tensor gx = grad_input ? at::empty_like(x) : x.new_empty({0});
  at::Tensor gw = grad_weight ? at::zeros({Cout, K}, x.options().dtype(acc)) : weight.new_empty({0});
  if (x.numel() == 0 || Cout == 0) {
    if (grad_input) gx.zero_();
    return {gx, grad_weight ? gw.view(weight.sizes()).to(weight.scalar_type()) : gw};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_conv_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto gy = args.view<scalar_t, acc_t>(grad_y, y);
    const auto geo = geometry<acc_t>(x, Cout);
    if (grad_input) {
      const at::Tensor w2 = weight.permute({0, 2, 3, 1}).to(acc).contiguous();  // (Cout, 3, 3, Cin)
      const int64_t tiles_h = (H + kTileH - 1) / kTileH, tiles_w = (W + kTileW - 1) / kTileW;
      const dim3 grid(static_cast<unsigned>(x.size(0) * tiles_h * tiles_w),
                      static_cast<unsigned>((Cin + kChannels - 1) / kChannels));
      launch(&grad_input_kernel<scalar_t, acc_t>, grid, dim3(kThreads), gy, w2.const_data_ptr<acc_t>(), gx.data_ptr<scalar_t>(), gx.stride(0), gx.stride(1), gx.stride(2),
          gx.stride(3), geo, tiles_h, tiles_w);
    }
    if (grad_weight) {
      // Enough blocks to fill the GPU several times over: the m range is split across blockIdx.z.
      const int64_t M = geo.N * geo.OH * geo.OW;
      const int64_t tiles = ((K + kTile - 1) / kTile) * ((Cout + kTile - 1) / kTile);
      const int64_t want = 4 * sm_count;
      const int64_t splits = std::clamp<int64_t>((want + tiles - 1) / tiles, 1, (M + kStep - 1) / kStep);
      const int64_t chunk = ((M + splits - 1) / splits + kStep - 1) / kStep * kStep;
      const dim3 grid(static_cast<unsigned>((K + kTile - 1) / kTile), static_cast<unsigned>((Cout + kTile - 1) / kTile),
                      static_cast<unsigned>((M + chunk - 1) / chunk));
      launch(&grad_weight_kernel<scalar_t, acc_t>, grid, dim3(kThreads), gy, x.const_data_ptr<scalar_t>(),
             gw.data_ptr<acc_t>(), geo, chunk);
    }
  });
  if (grad_weight) gw = gw.view(weight.sizes()).to(weight.scalar_type());
  return {gx, gw};
}

}  // namespace upsample
}  // namespace madfast
