// CUDA kernels of madfast::channel_moments and its backward. Moments: one block per channel,
// shifted sums (x - pivot) in double (a thread adds M/256 terms: thousands for a 224-px BN
// input), reduced through shared memory. Backward:
// one elementwise pass in x's memory order, grad_x = a_c + b_c x.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../channel_moments.h"

namespace madfast {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    channel_moments_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t HW, int64_t sN, int64_t sC, int64_t sHW,
                           at::opmath_type<scalar_t>* __restrict__ mean, at::opmath_type<scalar_t>* __restrict__ var) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x, M = N * HW;
  const scalar_t* base = x + c * sC;
  const acc_t pivot = M ? acc_t(base[0]) : acc_t(0);
  double s1 = 0, s2 = 0;
  for (int64_t i = threadIdx.x; i < M; i += kThreads) {
    const int64_t n = i / HW, hw = i - n * HW;
    const double d = double(acc_t(base[n * sN + hw * sHW]) - pivot);
    s1 += d;
    s2 += d * d;
  }
  __shared__ double sh1[kThreads], sh2[kThreads];
  sh1[threadIdx.x] = s1;
  sh2[threadIdx.x] = s2;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      sh1[threadIdx.x] += sh1[threadIdx.x + stride];
      sh2[threadIdx.x] += sh2[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double m1 = sh1[0] / double(M);
    mean[c] = acc_t(double(pivot) + m1);
    var[c] = acc_t(sh2[0] / double(M) - m1 * m1);
  }
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void channel_moments_backward_kernel(const scalar_t* __restrict__ x, int64_t numel, int64_t C, int64_t HW,
                                                bool channels_last, const acc_t* __restrict__ grad_mean,
                                                const acc_t* __restrict__ grad_var, const acc_t* __restrict__ mean,
                                                acc_t inv_m, scalar_t* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = channels_last ? i % C : (i / HW) % C;
    const acc_t gv = acc_t(2) * grad_var[c] * inv_m;
    out[i] = static_cast<scalar_t>(grad_mean[c] * inv_m + gv * (acc_t(x[i]) - mean[c]));
  }
}

std::tuple<at::Tensor, at::Tensor> channel_moments_cuda(const at::Tensor& input) {
  const ChannelView v(input, "channel_moments", "x");
  const c10::cuda::CUDAGuard guard(v.x.device());
  const auto acc = v.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({v.C}, v.x.options().dtype(acc)), var = at::empty({v.C}, v.x.options().dtype(acc));
  if (v.C == 0) return {mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "channel_moments_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    channel_moments_kernel<scalar_t><<<static_cast<unsigned>(v.C), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        v.x.const_data_ptr<scalar_t>(), v.N, v.HW, v.sN, v.sC, v.sHW, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

at::Tensor channel_moments_backward_cuda(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                         const at::Tensor& input, const at::Tensor& mean) {
  const ChannelView v(input, "channel_moments", "x");
  check_moments_backward(grad_mean, grad_var, v, mean);
  const c10::cuda::CUDAGuard guard(v.x.device());
  at::Tensor out = at::empty_like(v.x);
  const int64_t numel = v.x.numel();
  if (numel == 0) return out;
  const auto acc = v.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor gm = grad_mean.to(acc).contiguous(), gv = grad_var.to(acc).contiguous(),
                   mu = mean.to(acc).contiguous();
  const int blocks = static_cast<int>(std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "channel_moments_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    channel_moments_backward_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        v.x.const_data_ptr<scalar_t>(), numel, v.C, v.HW, v.channels_last(), gm.const_data_ptr<acc_t>(),
        gv.const_data_ptr<acc_t>(), mu.const_data_ptr<acc_t>(), acc_t(1) / acc_t(v.N * v.HW), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CUDA, m) {
  m.impl("channel_moments", &channel_moments_cuda);
  m.impl("channel_moments_backward", &channel_moments_backward_cuda);
}

}  // namespace madfast
