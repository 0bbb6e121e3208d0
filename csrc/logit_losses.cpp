// CPU kernels of madfast::kl_div_fwd / kl_div_bwd and l1_fwd / l1_bwd (see logit_losses.h): rows
// in parallel, each row read from memory once per pass (its second read in the forward comes from
// cache); the reduction over rows serial in a fixed order, so results do not depend on threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cpu_vectorize.h"
#include "logit_losses.h"

namespace madfast {
namespace {

constexpr int kLanes = 8;        // independent partial sums, so that GCC vectorizes the loops
constexpr int64_t kChunk = 1024;  // fp32 lanes add at most kChunk / kLanes terms before a flush

int64_t grain(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

template <typename acc_t>
acc_t lane_sum(const acc_t (&v)[kLanes]) {
  acc_t out = 0;
  for (int j = 0; j < kLanes; ++j) out += v[j];
  return out;
}

// Sum of n values in a fixed order (lanes, then the lanes' totals).
template <typename acc_t>
acc_t fixed_order_sum(const acc_t* v, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += v[i + j];
  acc_t out = lane_sum(lanes);
  for (; i < n; ++i) out += v[i];
  return out;
}

template <typename scalar_t, typename acc_t>
MADFAST_CPU_CLONES void row_max(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t C, acc_t& ms,
                                acc_t& mt) {
  acc_t ls[kLanes], lt[kLanes];
  std::fill(ls, ls + kLanes, -std::numeric_limits<acc_t>::infinity());
  std::fill(lt, lt + kLanes, -std::numeric_limits<acc_t>::infinity());
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const acc_t xs = acc_t(s[c + j]), xt = acc_t(t[c + j]);
      ls[j] = ls[j] > xs ? ls[j] : xs;
      lt[j] = lt[j] > xt ? lt[j] : xt;
    }
  for (; c < C; ++c) {
    ls[0] = std::max(ls[0], acc_t(s[c]));
    lt[0] = std::max(lt[0], acc_t(t[c]));
  }
  ms = *std::max_element(ls, ls + kLanes);
  mt = *std::max_element(lt, lt + kLanes);
}

// The row's KlState with its maxima fixed (two exps per element; no rescaling on CPU).
template <typename scalar_t, typename acc_t>
MADFAST_CPU_CLONES KlState<acc_t> kl_row(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t C,
                                         acc_t inv_tau) {
  acc_t ms, mt;
  row_max(s, t, C, ms, mt);
  KlState<acc_t> st{ms * inv_tau, 0, mt * inv_tau, 0, 0};  // max(x)/T = max(x/T): T > 0
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t c1 = std::min(C, c0 + kChunk);
    acc_t ss[kLanes] = {}, tt[kLanes] = {}, w[kLanes] = {};
    int64_t c = c0;
    for (; c + kLanes <= c1; c += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const acc_t ds = acc_t(s[c + j]) * inv_tau - st.ms, dt = acc_t(t[c + j]) * inv_tau - st.mt;
        const acc_t et = exp_nonpositive(dt);
        ss[j] += exp_nonpositive(ds);
        tt[j] += et;
        w[j] += et * (dt - ds);
      }
    for (; c < c1; ++c) {
      const acc_t ds = acc_t(s[c]) * inv_tau - st.ms, dt = acc_t(t[c]) * inv_tau - st.mt;
      const acc_t et = exp_nonpositive(dt);
      ss[0] += exp_nonpositive(ds);
      tt[0] += et;
      w[0] += et * (dt - ds);
    }
    st.ss += lane_sum(ss), st.st += lane_sum(tt), st.w += lane_sum(w);
  }
  return st;
}

template <typename scalar_t, typename acc_t>
MADFAST_CPU_CLONES void kl_grad_row(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t C,
                                    acc_t inv_tau, const acc_t* st, acc_t g_tau, scalar_t* __restrict__ gs,
                                    scalar_t* __restrict__ gt) {
  const acc_t ms = st[kMaxS], log_s = st[kLogS], mt = st[kMaxT], log_t = st[kLogT], kl = st[kKl];
  for (int64_t c = 0; c < C; ++c) {
    const acc_t lps = (acc_t(s[c]) * inv_tau - ms) - log_s, lpt = (acc_t(t[c]) * inv_tau - mt) - log_t;
    const acc_t pt = exp_nonpositive(lpt);
    if (gs) gs[c] = static_cast<scalar_t>(g_tau * (exp_nonpositive(lps) - pt));
    if (gt) gt[c] = static_cast<scalar_t>(g_tau * pt * ((lpt - lps) - kl));
  }
}

// Writes loss = sign * min(D, bound) and total = D from the (B,) row values (or the rows for "none").
template <typename scalar_t, typename acc_t>
void finish(const LogitLossArgs& a, const acc_t* rows, acc_t row_scale, at::Tensor& loss, at::Tensor& total) {
  if (!a.reduced()) {
    scalar_t* out = loss.data_ptr<scalar_t>();
    for (int64_t b = 0; b < a.B; ++b) out[b] = static_cast<scalar_t>(rows[b] * row_scale);
    return;
  }
  const acc_t d = fixed_order_sum(rows, a.B) * row_scale * acc_t(a.factor);
  total.data_ptr<acc_t>()[0] = d;
  loss.data_ptr<scalar_t>()[0] =
      static_cast<scalar_t>(bounded(d, a.bound.has_value(), acc_t(a.bound.value_or(0)), acc_t(a.sign)));
}

// grad_output times the chain rule of the reduction and the bound, for row b.
template <typename scalar_t, typename acc_t>
acc_t row_grad(const LogitLossArgs& a, const scalar_t* grad, int64_t g_stride, const at::Tensor& total, int64_t b) {
  const acc_t g = acc_t(grad[b * g_stride]);
  if (!a.reduced()) return g;
  return g * acc_t(a.factor) *
         bounded_grad(total.const_data_ptr<acc_t>()[0], a.bound.has_value(), acc_t(a.bound.value_or(0)),
                      acc_t(a.sign));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                              double temperature, c10::string_view reduction,
                                                              double sign, std::optional<double> bound) {
  const LogitLossArgs a(student, teacher, temperature, reduction, sign, bound, "kl_div_fwd");
  at::Tensor loss = a.new_loss(), total = a.new_total();
  at::Tensor stats = at::empty({kKlStats, a.B}, a.s.options().dtype(a.acc()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.s.scalar_type(), "kl_div_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = a.s.const_data_ptr<scalar_t>();
    const scalar_t* tp = a.t.const_data_ptr<scalar_t>();
    acc_t* st = stats.data_ptr<acc_t>();
    const acc_t inv_tau = acc_t(1) / acc_t(temperature);
    at::parallel_for(0, a.B, grain(a.C), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const KlState<acc_t> r = kl_row(sp + b * a.s.stride(0), tp + b * a.t.stride(0), a.C, inv_tau);
        st[kMaxS * a.B + b] = r.ms, st[kLogS * a.B + b] = std::log(r.ss);
        st[kMaxT * a.B + b] = r.mt, st[kLogT * a.B + b] = std::log(r.st);
        st[kKl * a.B + b] = r.kl();
      }
    });
    finish<scalar_t>(a, st + kKl * a.B, acc_t(temperature * temperature), loss, total);
  });
  return {loss, stats, total};
}

std::tuple<at::Tensor, at::Tensor> kl_div_bwd_cpu(const at::Tensor& grad, const at::Tensor& student,
                                                  const at::Tensor& teacher, const at::Tensor& stats,
                                                  const at::Tensor& total, double temperature,
                                                  c10::string_view reduction, double sign, std::optional<double> bound,
                                                  bool grad_s, bool grad_t) {
  const LogitLossArgs a(student, teacher, temperature, reduction, sign, bound, "kl_div_bwd");
  check_kl_stats(stats, a, "kl_div_bwd");
  check_total(total, a, "kl_div_bwd");
  at::Tensor gs = a.new_grad(grad_s), gt = a.new_grad(grad_t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.s.scalar_type(), "kl_div_bwd_cpu", [&] {
    constexpr const char* OP = "kl_div_bwd";
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor g = grad.to(a.s.scalar_type());  // may change the strides: read them after
    const int64_t g_stride = grad_stride(g, a, OP);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const acc_t* st = stats.const_data_ptr<acc_t>();
    const acc_t tau = acc_t(temperature), inv_tau = acc_t(1) / tau;
    scalar_t* gsp = grad_s ? gs.data_ptr<scalar_t>() : nullptr;
    scalar_t* gtp = grad_t ? gt.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, a.B, grain(a.C), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const acc_t row[kKlStats] = {st[kMaxS * a.B + b], st[kLogS * a.B + b], st[kMaxT * a.B + b],
                                     st[kLogT * a.B + b], st[kKl * a.B + b]};
        kl_grad_row(a.s.const_data_ptr<scalar_t>() + b * a.s.stride(0),
                    a.t.const_data_ptr<scalar_t>() + b * a.t.stride(0), a.C, inv_tau, row,
                    row_grad<scalar_t, acc_t>(a, gp, g_stride, total, b) * tau, gsp ? gsp + b * a.C : nullptr,
                    gtp ? gtp + b * a.C : nullptr);
      }
    });
  });
  return {gs, gt};
}

std::tuple<at::Tensor, at::Tensor> l1_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                              c10::string_view reduction, double sign, std::optional<double> bound) {
  const LogitLossArgs a(student, teacher, 1.0, reduction, sign, bound, "l1_fwd");
  at::Tensor loss = a.new_loss(), total = a.new_total();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.s.scalar_type(), "l1_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> rows(a.B);
    at::parallel_for(0, a.B, grain(a.C), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* s = a.s.const_data_ptr<scalar_t>() + b * a.s.stride(0);
        const scalar_t* t = a.t.const_data_ptr<scalar_t>() + b * a.t.stride(0);
        acc_t sum = 0;
        for (int64_t c0 = 0; c0 < a.C; c0 += kChunk) {
          acc_t lanes[kLanes] = {};
          const int64_t c1 = std::min(a.C, c0 + kChunk);
          int64_t c = c0;
          for (; c + kLanes <= c1; c += kLanes)
            for (int j = 0; j < kLanes; ++j) lanes[j] += std::abs(acc_t(s[c + j]) - acc_t(t[c + j]));
          for (; c < c1; ++c) lanes[0] += std::abs(acc_t(s[c]) - acc_t(t[c]));
          sum += lane_sum(lanes);
        }
        rows[b] = sum;
      }
    });
    finish<scalar_t>(a, rows.data(), acc_t(1), loss, total);
  });
  return {loss, total};
}

std::tuple<at::Tensor, at::Tensor> l1_bwd_cpu(const at::Tensor& grad, const at::Tensor& student,
                                              const at::Tensor& teacher, const at::Tensor& total,
                                              c10::string_view reduction, double sign, std::optional<double> bound,
                                              bool grad_s, bool grad_t) {
  const LogitLossArgs a(student, teacher, 1.0, reduction, sign, bound, "l1_bwd");
  check_total(total, a, "l1_bwd");
  at::Tensor gs = a.new_grad(grad_s), gt = a.new_grad(grad_t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.s.scalar_type(), "l1_bwd_cpu", [&] {
    constexpr const char* OP = "l1_bwd";
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor g = grad.to(a.s.scalar_type());  // may change the strides: read them after
    const int64_t g_stride = grad_stride(g, a, OP);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gsp = grad_s ? gs.data_ptr<scalar_t>() : nullptr;
    scalar_t* gtp = grad_t ? gt.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, a.B, grain(a.C), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* s = a.s.const_data_ptr<scalar_t>() + b * a.s.stride(0);
        const scalar_t* t = a.t.const_data_ptr<scalar_t>() + b * a.t.stride(0);
        const acc_t rg = row_grad<scalar_t, acc_t>(a, gp, g_stride, total, b);
        for (int64_t c = 0; c < a.C; ++c) {
          const acc_t d = acc_t(s[c]) - acc_t(t[c]), v = rg * acc_t((d > 0) - (d < 0));
          if (gsp) gsp[b * a.C + c] = static_cast<scalar_t>(v);
          if (gtp) gtp[b * a.C + c] = static_cast<scalar_t>(-v);
        }
      }
    });
  });
  return {gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CPU, m) {
  m.impl("kl_div_fwd", &kl_div_fwd_cpu);
  m.impl("kl_div_bwd", &kl_div_bwd_cpu);
  m.impl("l1_fwd", &l1_fwd_cpu);
  m.impl("l1_bwd", &l1_bwd_cpu);
}

}  // namespace madfast
