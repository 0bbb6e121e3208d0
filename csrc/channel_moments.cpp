// CPU kernels of madfast::channel_moments (per-channel mean and biased variance, one read of
// x) and its backward (one read of x, one write), accumulated in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "channel_moments.h"

namespace madfast {
namespace {

std::tuple<at::Tensor, at::Tensor> channel_moments_cpu(const at::Tensor& input) {
  const ChannelView v(input, "channel_moments", "x");
  const auto acc = acc_type(v.x.scalar_type());
  at::Tensor mean = at::empty({v.C}, v.x.options().dtype(acc)), var = at::empty({v.C}, v.x.options().dtype(acc));
  const int64_t M = v.N * v.HW;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "channel_moments_cpu", [&] {
    const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
    at::parallel_for(0, v.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        // Sums of (x - pivot) keep E[x^2] - E[x]^2 from cancelling when |mean| >> std.
        const double pivot = M ? double(xp[c * v.sC]) : 0.0;
        double s1 = 0, s2 = 0;
        for (int64_t n = 0; n < v.N; ++n) {
          const scalar_t* base = xp + n * v.sN + c * v.sC;
          for (int64_t i = 0; i < v.HW; ++i) {
            const double d = double(base[i * v.sHW]) - pivot;
            s1 += d;
            s2 += d * d;
          }
        }
        const double m1 = M ? s1 / M : NAN;
        AT_DISPATCH_FLOATING_TYPES(acc, "store", [&] {
          mean.data_ptr<scalar_t>()[c] = scalar_t(pivot + m1);
          var.data_ptr<scalar_t>()[c] = scalar_t(M ? s2 / M - m1 * m1 : NAN);
        });
      }
    });
  });
  return {mean, var};
}

at::Tensor channel_moments_backward_cpu(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                        const at::Tensor& input, const at::Tensor& mean) {
  const ChannelView v(input, "channel_moments", "x");
  check_moments_backward(grad_mean, grad_var, v, mean);
  at::Tensor out = at::empty_like(v.x);  // same layout as x
  const double M = double(v.N * v.HW);
  // d/dx of mean_c and var_c: 1/M and 2 (x - mean_c)/M, so grad_x = a_c + b_c x.
  const at::Tensor gm = grad_mean.to(at::kDouble), gv = grad_var.to(at::kDouble), mu = mean.to(at::kDouble);
  const at::Tensor a = (gm - 2 * gv * mu) / M, b = 2 * gv / M;
  const double* ap = a.const_data_ptr<double>();
  const double* bp = b.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "channel_moments_backward_cpu", [&] {
    const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, v.N * v.C, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t n = j / v.C, c = j % v.C, base = n * v.sN + c * v.sC;
        for (int64_t i = 0; i < v.HW; ++i) {
          const int64_t k = base + i * v.sHW;
          op[k] = static_cast<scalar_t>(ap[c] + bp[c] * double(xp[k]));
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CPU, m) {
  m.impl("channel_moments", &channel_moments_cpu);
  m.impl("channel_moments_backward", &channel_moments_backward_cpu);
}

}  // namespace madfast
