// The CUDA kernels of madfast::channel_moments and its backward, and their host side (`launch` is
// supplied by the includer: csrc/cuda/channel_moments.cu, or the CPU emulator in tests/cuda_emulator).
// Moments: bn_stat_losses' split reduction (csrc/cuda/bn_stat_losses.cuh) for one tensor — fp32
// partials (fp64 only for fp64), Chan merges in a fixed order. Backward: one elementwise pass in x's
// memory order, grad_x = a_c + b_c x.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <tuple>

#include "../channel_moments.h"
#include "bn_stat_losses.cuh"

namespace madfast {
namespace moments {

constexpr int kThreads = 256;

// The channel of flat index i in memory order — (i / R) % C with R = HW (NCHW) or 1 (channels_last) —
// advanced by a fixed grid stride with two compares instead of a 64-bit division per element.
struct ChannelWalk {
  int64_t c, r, dc, dr, C, R;

  __device__ __forceinline__ ChannelWalk(int64_t i, int64_t step, int64_t C_, int64_t R_) : C(C_), R(R_) {
    const int64_t q = i / R, dq = step / R;
    c = q % C;
    r = i - q * R;
    dc = dq % C;
    dr = step - dq * R;
  }
  __device__ __forceinline__ void next() {
    r += dr;
    c += dc;
    if (r >= R) r -= R, ++c;
    if (c >= C) c -= C;  // c + dc + 1 < 2C
  }
};

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ x, int64_t numel, int64_t C, int64_t HW, bool channels_last,
                    const acc_t* __restrict__ grad_mean, const acc_t* __restrict__ grad_var,
                    const acc_t* __restrict__ mean, acc_t inv_m, scalar_t* __restrict__ out) {
  const int64_t step = int64_t(gridDim.x) * kThreads;
  int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  for (ChannelWalk ch(i, step, C, channels_last ? 1 : HW); i < numel; i += step, ch.next()) {
    const acc_t gv = acc_t(2) * grad_var[ch.c] * inv_m;
    out[i] = static_cast<scalar_t>(grad_mean[ch.c] * inv_m + gv * (acc_t(x[i]) - mean[ch.c]));
  }
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> forward_gpu(const at::Tensor& input, const Launch& launch) {
  return bn_losses::moments_gpu(ChannelView(input, "channel_moments", "x"), launch);
}

template <typename Launch>
at::Tensor backward_gpu(const at::Tensor& grad_mean, const at::Tensor& grad_var, const at::Tensor& input,
                        const at::Tensor& mean, const Launch& launch, int64_t max_blocks = 65535) {
  const ChannelView v(input, "channel_moments_backward", "x");
  check_moments_backward(grad_mean, grad_var, v, mean);
  at::Tensor out = at::empty_like(v.x);
  const int64_t numel = v.x.numel();
  if (numel == 0) return out;
  const auto acc = acc_type(v.x.scalar_type());
  const at::Tensor gm = grad_mean.to(acc).contiguous(), gv = grad_var.to(acc).contiguous(),
                   mu = mean.to(acc).contiguous();
  // max_blocks: the emulator's tests take a few blocks so that the grid-stride walk runs many steps
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((numel + kThreads - 1) / kThreads, max_blocks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "channel_moments_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(&backward_kernel<scalar_t>, dim3(blocks), dim3(kThreads), v.x.const_data_ptr<scalar_t>(), numel, v.C, v.HW,
           v.channels_last(), gm.const_data_ptr<acc_t>(), gv.const_data_ptr<acc_t>(), mu.const_data_ptr<acc_t>(),
           acc_t(1) / acc_t(v.N * v.HW), out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace moments
}  // namespace madfast
