// The CUDA kernels of madfast::kl_div_fwd and madfast::l1_fwd, and their host side (`launch` is
// supplied by the includer: csrc/cuda/logit_losses.cu, or the CPU emulator in tests/cuda_emulator).
// One warp per row, eight rows per block, everything in one launch; the loss of each row and its
// gradients in the same kernel.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "../logit_losses.h"

namespace madfast {
namespace logit_kernels {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;

// Merges per-lane online-softmax states (max m, sum of exp(x - m)) across the warp.
// Row sums are carried in double: a lane adds up to C/32 terms (700 for 21k classes), more
// than fp32 sums without visible error; the exponentials stay in acc_t.
template <typename acc_t>
__device__ void warp_merge_lse(acc_t& m, double& sum) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const acc_t om = __shfl_xor_sync(0xffffffff, m, offset);
    const double osum = __shfl_xor_sync(0xffffffff, sum, offset);
    const acc_t nm = m > om ? m : om;
    if (nm != -std::numeric_limits<acc_t>::infinity()) {  // lanes that saw no element hold (-inf, 0)
      sum = sum * double(std::exp(m - nm)) + osum * double(std::exp(om - nm));
      m = nm;
    }
  }
}

__device__ double warp_sum(double v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

template <typename scalar_t>
__global__ void kl_div_fwd_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t B,
                                  int64_t C, int64_t s_stride, int64_t t_stride, at::opmath_type<scalar_t> tau,
                                  at::opmath_type<scalar_t>* __restrict__ loss, scalar_t* __restrict__ gs,
                                  scalar_t* __restrict__ gt) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= B) return;  // whole warps exit together
  const scalar_t* srow = s + row * s_stride;
  const scalar_t* trow = t + row * t_stride;
  const acc_t inv_tau = acc_t(1) / tau;

  acc_t m_s = -std::numeric_limits<acc_t>::infinity(), m_t = m_s;
  double sum_s = 0, sum_t = 0;
  for (int64_t c = lane; c < C; c += kWarp) {
    const acc_t xs = acc_t(srow[c]) * inv_tau, xt = acc_t(trow[c]) * inv_tau;
    if (xs > m_s) { sum_s = sum_s * double(std::exp(m_s - xs)) + 1.0; m_s = xs; } else { sum_s += std::exp(xs - m_s); }
    if (xt > m_t) { sum_t = sum_t * double(std::exp(m_t - xt)) + 1.0; m_t = xt; } else { sum_t += std::exp(xt - m_t); }
  }
  warp_merge_lse(m_s, sum_s);
  warp_merge_lse(m_t, sum_t);
  // log p = (x - max) - log sum: never forms max + log sum, which loses digits for |x| ~ 1e4.
  const acc_t log_s = acc_t(std::log(sum_s)), log_t = acc_t(std::log(sum_t));

  double kl_sum = 0;
  for (int64_t c = lane; c < C; c += kWarp) {
    const acc_t lpt = (acc_t(trow[c]) * inv_tau - m_t) - log_t, lps = (acc_t(srow[c]) * inv_tau - m_s) - log_s;
    kl_sum += std::exp(lpt) * (lpt - lps);
  }
  const acc_t kl = acc_t(warp_sum(kl_sum));
  if (lane == 0) loss[row] = kl * tau * tau;
  if (gs == nullptr && gt == nullptr) return;
  for (int64_t c = lane; c < C; c += kWarp) {
    const acc_t lpt = (acc_t(trow[c]) * inv_tau - m_t) - log_t, lps = (acc_t(srow[c]) * inv_tau - m_s) - log_s;
    const acc_t pt = std::exp(lpt);
    if (gs) gs[row * C + c] = static_cast<scalar_t>(tau * (std::exp(lps) - pt));
    if (gt) gt[row * C + c] = static_cast<scalar_t>(tau * pt * (lpt - lps - kl));
  }
}

template <typename scalar_t>
__global__ void l1_fwd_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t B, int64_t C,
                              int64_t s_stride, int64_t t_stride, at::opmath_type<scalar_t>* __restrict__ loss,
                              scalar_t* __restrict__ gs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= B) return;
  double total = 0;
  for (int64_t c = lane; c < C; c += kWarp) {
    const acc_t d = acc_t(s[row * s_stride + c]) - acc_t(t[row * t_stride + c]);
    total += std::abs(d);
    if (gs) gs[row * C + c] = static_cast<scalar_t>(acc_t((d > 0) - (d < 0)));
  }
  total = warp_sum(total);
  if (lane == 0) loss[row] = acc_t(total);
}

inline unsigned blocks_for(int64_t B) { return static_cast<unsigned>((B + kRowsPerBlock - 1) / kRowsPerBlock); }

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_fwd_gpu(const at::Tensor& student, const at::Tensor& teacher,
                                                              double temperature, bool grad_s, bool grad_t,
                                                              const Launch& launch) {
  check_logits(student, teacher, "kl_div_fwd");
  TORCH_CHECK_VALUE(temperature > 0, "kl_div_fwd: temperature must be > 0, got ", temperature);
  const at::Tensor s = rows_unit_stride(student), t = rows_unit_stride(teacher);
  at::Tensor loss = at::empty({s.size(0)}, s.options().dtype(loss_dtype(s)));
  at::Tensor gs = grad_or_empty(s, grad_s), gt = grad_or_empty(s, grad_t);
  if (s.size(0) == 0) return {loss, gs, gt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kl_div_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(&kl_div_fwd_kernel<scalar_t>, dim3(blocks_for(s.size(0))), dim3(kWarp * kRowsPerBlock),
        s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), s.size(0), s.size(1), s.stride(0), t.stride(0),
        acc_t(temperature), loss.data_ptr<acc_t>(), grad_s ? gs.data_ptr<scalar_t>() : nullptr,
        grad_t ? gt.data_ptr<scalar_t>() : nullptr);
  });
  return {loss, gs, gt};
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> l1_fwd_gpu(const at::Tensor& student, const at::Tensor& teacher, bool grad_s,
                                              const Launch& launch) {
  check_logits(student, teacher, "l1_fwd");
  const at::Tensor s = rows_unit_stride(student), t = rows_unit_stride(teacher);
  at::Tensor loss = at::empty({s.size(0)}, s.options().dtype(loss_dtype(s)));
  at::Tensor gs = grad_or_empty(s, grad_s);
  if (s.size(0) == 0) return {loss, gs};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "l1_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(&l1_fwd_kernel<scalar_t>, dim3(blocks_for(s.size(0))), dim3(kWarp * kRowsPerBlock),
        s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), s.size(0), s.size(1), s.stride(0), t.stride(0),
        loss.data_ptr<acc_t>(), grad_s ? gs.data_ptr<scalar_t>() : nullptr);
  });
  return {loss, gs};
}

}  // namespace logit_kernels
}  // namespace madfast
