// CPU kernels of madfast::kl_div_fwd and madfast::l1_fwd: rows in parallel, each row
// read from cache after the first pass.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_vectorize.h"
#include "logit_losses.h"

namespace madfast {
namespace {

// d -= max; e = exp(d); returns the sum of e (in double: rows of 21k classes).
template <typename acc_t>
MADFAST_CPU_CLONES double shift_and_exp(acc_t* __restrict__ d, acc_t* __restrict__ e, int64_t n, acc_t max) {
  double sum = 0;
  for (int64_t c = 0; c < n; ++c) {
    d[c] -= max;
    e[c] = exp_nonpositive(d[c]);
  }
  for (int64_t c = 0; c < n; ++c) sum += e[c];
  return sum;
}

template <typename scalar_t>
void kl_rows_cpu(const at::Tensor& s, const at::Tensor& t, double temperature, at::Tensor& loss, at::Tensor& gs,
                 at::Tensor& gt) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = s.size(0), C = s.size(1);
  const acc_t inv_tau = acc_t(1) / acc_t(temperature), tau = acc_t(temperature);
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  const int64_t ss = s.stride(0), ts = t.stride(0);
  acc_t* lp = loss.data_ptr<acc_t>();
  scalar_t* gsp = gs.numel() ? gs.data_ptr<scalar_t>() : nullptr;
  scalar_t* gtp = gt.numel() ? gt.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, B, /*grain_size=*/std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t b0, int64_t b1) {
    // Per row: x/T - max and its exponential, kept so that each element costs two exps.
    std::vector<acc_t> ds(C), dt(C), es(C), et(C);
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* srow = sp + b * ss;
      const scalar_t* trow = tp + b * ts;
      acc_t max_s = -std::numeric_limits<acc_t>::infinity(), max_t = max_s;
      for (int64_t c = 0; c < C; ++c) {
        ds[c] = acc_t(srow[c]) * inv_tau;
        dt[c] = acc_t(trow[c]) * inv_tau;
        max_s = std::max(max_s, ds[c]);
        max_t = std::max(max_t, dt[c]);
      }
      const double sum_s = shift_and_exp(ds.data(), es.data(), C, max_s);
      const double sum_t = shift_and_exp(dt.data(), et.data(), C, max_t);
      // log p = (x - max) - log sum: never forms max + log sum, which loses digits for |x| ~ 1e4.
      const acc_t log_s = acc_t(std::log(sum_s)), log_t = acc_t(std::log(sum_t));
      const acc_t inv_sum_s = acc_t(1.0 / sum_s), inv_sum_t = acc_t(1.0 / sum_t);
      double kl_sum = 0;
      for (int64_t c = 0; c < C; ++c) kl_sum += et[c] * inv_sum_t * ((dt[c] - log_t) - (ds[c] - log_s));
      const acc_t kl = acc_t(kl_sum);
      lp[b] = kl * tau * tau;
      for (int64_t c = 0; gsp != nullptr && c < C; ++c) {
        gsp[b * C + c] = static_cast<scalar_t>(tau * (es[c] * inv_sum_s - et[c] * inv_sum_t));
      }
      for (int64_t c = 0; gtp != nullptr && c < C; ++c) {
        const acc_t pt = et[c] * inv_sum_t;
        gtp[b * C + c] = static_cast<scalar_t>(tau * pt * ((dt[c] - log_t) - (ds[c] - log_s) - kl));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                              double temperature, bool grad_s, bool grad_t) {
  check_logits(student, teacher, "kl_div_fwd");
  TORCH_CHECK_VALUE(temperature > 0, "kl_div_fwd: temperature must be > 0, got ", temperature);
  const at::Tensor s = rows_unit_stride(student), t = rows_unit_stride(teacher);
  at::Tensor loss = at::empty({s.size(0)}, s.options().dtype(loss_dtype(s)));
  at::Tensor gs = grad_or_empty(s, grad_s), gt = grad_or_empty(s, grad_t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kl_div_fwd_cpu",
                                  [&] { kl_rows_cpu<scalar_t>(s, t, temperature, loss, gs, gt); });
  return {loss, gs, gt};
}

std::tuple<at::Tensor, at::Tensor> l1_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher, bool grad_s) {
  check_logits(student, teacher, "l1_fwd");
  const at::Tensor s = rows_unit_stride(student), t = rows_unit_stride(teacher);
  at::Tensor loss = at::empty({s.size(0)}, s.options().dtype(loss_dtype(s)));
  at::Tensor gs = grad_or_empty(s, grad_s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "l1_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t B = s.size(0), C = s.size(1), ss = s.stride(0), ts = t.stride(0);
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    acc_t* lp = loss.data_ptr<acc_t>();
    scalar_t* gsp = gs.numel() ? gs.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double total = 0;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = acc_t(sp[b * ss + c]) - acc_t(tp[b * ts + c]);
          total += std::abs(d);
          if (gsp) gsp[b * C + c] = static_cast<scalar_t>((d > 0) - (d < 0));
        }
        lp[b] = acc_t(total);
      }
    });
  });
  return {loss, gs};
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CPU, m) {
  m.impl("kl_div_fwd", &kl_div_fwd_cpu);
  m.impl("l1_fwd", &l1_fwd_cpu);
}

}  // namespace madfast
