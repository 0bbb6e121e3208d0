// The CUDA kernels of madfast::bn_lrelu and its backward, and their host side (`launch` is
// supplied by the includer: csrc/cuda/bn_lrelu.cu, or the CPU emulator in tests/cuda_emulator).
// Forward: one elementwise pass in y's memory order. Backward: blocks of (channel, part of N*H*W)
// write grad_y and reduce Sum gz*y and Sum gz in shared memory, one atomic per block and sum, so
// that few channels still fill the GPU.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <climits>
#include <tuple>

#include "../bn_lrelu.h"
#include "block_reduce.cuh"

namespace madfast {
namespace bn_lrelu {

constexpr int kThreads = 256, kMaxParts = 64;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ y, scalar_t* __restrict__ out, int64_t numel, int64_t C, int64_t HW,
                   bool channels_last, const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, acc_t slope) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < numel; i += int64_t(gridDim.x) * kThreads) {
    const int64_t c = channels_last ? i % C : (i / HW) % C;
    out[i] = static_cast<scalar_t>(forward(static_cast<acc_t>(y[i]), scale[c], shift[c], slope));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad, int64_t gN, int64_t gC, int64_t gHW,
                    const scalar_t* __restrict__ y, scalar_t* __restrict__ grad_y /* y's strides */, int64_t N,
                    int64_t HW, int64_t sN, int64_t sC, int64_t sHW, const acc_t* __restrict__ scale,
                    const acc_t* __restrict__ shift, acc_t slope, acc_t* __restrict__ grad_scale,
                    acc_t* __restrict__ grad_shift, int64_t chunk) {
  const int64_t c = blockIdx.x, M = N * HW, lo = int64_t(blockIdx.y) * chunk, hi = lo + chunk < M ? lo + chunk : M;
  const acc_t sc = scale[c], sh = shift[c];
  acc_t s1 = 0, s2 = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const int64_t n = i / HW, hw = i - n * HW, k = n * sN + c * sC + hw * sHW;
    const acc_t yv = static_cast<acc_t>(y[k]);
    const acc_t gz = grad_z(static_cast<acc_t>(grad[n * gN + c * gC + hw * gHW]), yv, sc, sh, slope);
    grad_y[k] = static_cast<scalar_t>(gz * sc);
    s1 += gz * yv;
    s2 += gz;
  }
  block_sum2<kThreads>(s1, s2);
  if (threadIdx.x == 0) {
    atomicAdd(&grad_scale[c], s1);
    atomicAdd(&grad_shift[c], s2);
  }
}

template <typename Launch>
at::Tensor forward_gpu(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, double slope,
                       const Launch& launch) {
  const Args a("bn_lrelu", y, scale, shift);
  const ChannelView& v = a.y;
  at::Tensor out = at::empty_like(v.x);
  const int64_t numel = v.x.numel();
  if (numel == 0) return out;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_lrelu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(&forward_kernel<scalar_t, acc_t>, dim3(blocks), dim3(kThreads), v.x.const_data_ptr<scalar_t>(),
           out.data_ptr<scalar_t>(), numel, v.C, v.HW, v.channels_last(), a.scale.const_data_ptr<acc_t>(),
           a.shift.const_data_ptr<acc_t>(), static_cast<acc_t>(slope));
  });
  return out;
}

// sm_count: the GPU's multiprocessors, which the split of each channel's N*H*W is sized for.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_gpu(const at::Tensor& grad, const at::Tensor& y,
                                                            const at::Tensor& scale, const at::Tensor& shift,
                                                            double slope, const Launch& launch, int64_t sm_count) {
  const Args a("bn_lrelu_backward", y, scale, shift);
  const ChannelView& v = a.y;
  const ChannelView gv = grad_view("bn_lrelu_backward", grad, v);
  at::Tensor gy = at::empty_like(v.x), g_scale = at::zeros_like(a.scale), g_shift = at::zeros_like(a.shift);
  const int64_t M = v.N * v.HW;
  if (M == 0 || v.C == 0) return {gy, g_scale, g_shift};
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>({(4 * sm_count + v.C - 1) / v.C, kMaxParts,
                                                                 (M + kThreads - 1) / kThreads}));
  const int64_t chunk = (M + parts - 1) / parts;
  TORCH_CHECK(v.C <= INT32_MAX, "bn_lrelu_backward: too many channels");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_lrelu_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(&backward_kernel<scalar_t, acc_t>, dim3(static_cast<unsigned>(v.C), static_cast<unsigned>((M + chunk - 1) / chunk)),
           dim3(kThreads), gv.x.const_data_ptr<scalar_t>(), gv.sN, gv.sC, gv.sHW, v.x.const_data_ptr<scalar_t>(),
           gy.data_ptr<scalar_t>(), v.N, v.HW, v.sN, v.sC, v.sHW, a.scale.const_data_ptr<acc_t>(),
           a.shift.const_data_ptr<acc_t>(), static_cast<acc_t>(slope), g_scale.data_ptr<acc_t>(),
           g_shift.data_ptr<acc_t>(), chunk);
  });
  return {gy, g_scale, g_shift};
}

}  // namespace bn_lrelu
}  // namespace madfast
