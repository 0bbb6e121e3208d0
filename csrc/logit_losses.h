// Shared by the CPU and CUDA logit-loss kernels (KL and L1, plain or adversarial): argument checks,
// output allocation, the reduction's scale and the per-row math both run.
//
// Forward (one pass over s and t): per-row statistics and the reduced loss
//   loss = sign * min(D, bound),  D = factor * sum_i row_i  (or the rows themselves for "none"),
// KL rows: row_i = T^2 KL(softmax(t_i/T) || softmax(s_i/T)); L1 rows: row_i = sum_j |s_ij - t_ij|.
// Backward (one more pass): both gradients from the saved statistics and the device grad_output.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string_view>
#include <tuple>

#include "acc_type.h"
#include "host_device.h"

namespace madfast {

enum class Reduction : int { kNone, kSum, kBatchMean, kMean };

inline Reduction parse_reduction(std::string_view r, const char* op) {
  if (r == "none") return Reduction::kNone;
  if (r == "sum") return Reduction::kSum;
  if (r == "batchmean") return Reduction::kBatchMean;
  TORCH_CHECK_VALUE(r == "mean", op, ": reduction must be one of ('batchmean', 'sum', 'mean', 'none'), got '", r,
                    "'");
  return Reduction::kMean;
}

// KL row statistics, shape (kKlStats, B) in the accumulation dtype: max and log-sum-exp offset of
// s/T and t/T kept apart (log p = (x - max) - log S never forms max + log S, which loses digits
// when |x| ~ 1e4), and the row's KL (without T^2).
enum KlStat : int { kMaxS, kLogS, kMaxT, kLogT, kKl, kKlStats };

inline void check_logits(const at::Tensor& s, const at::Tensor& t, const char* op) {
  TORCH_CHECK_VALUE(s.dim() == 2, op, ": student_logits must be 2-D (B, C), got shape ", s.sizes());
  TORCH_CHECK_VALUE(t.sizes() == s.sizes(), op, ": teacher_logits has shape ", t.sizes(), " but student_logits has ",
                    s.sizes());
  TORCH_CHECK_TYPE(s.is_floating_point() && t.scalar_type() == s.scalar_type(), op,
                   ": logits must share one floating dtype, got ", s.scalar_type(), " and ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == s.device(), op, ": logits must be on one device, got ", s.device(), " and ",
                    t.device());
}

// The arguments of one logit loss, checked once; what the kernels of both passes need.
struct LogitLossArgs {
  at::Tensor s, t;  // rows with unit column stride (any row stride)
  int64_t B, C;
  Reduction reduction;
  double temperature, sign, factor;  // factor: 1 (sum), 1/B (batchmean), 1/(B*C) (mean), 1 (none)
  std::optional<double> bound;

  LogitLossArgs(const at::Tensor& student, const at::Tensor& teacher, double temperature_, std::string_view red,
                double sign_, std::optional<double> bound_, const char* op)
      : temperature(temperature_), sign(sign_), bound(bound_) {
    check_logits(student, teacher, op);
    TORCH_CHECK_VALUE(temperature > 0, op, ": temperature must be > 0, got ", temperature);
    TORCH_CHECK_VALUE(sign == 1.0 || sign == -1.0, op, ": sign must be 1 or -1, got ", sign);
    reduction = parse_reduction(red, op);
    TORCH_CHECK_VALUE(!(bound && reduction == Reduction::kNone), op, ": a bound needs a reduced loss, not 'none'");
    s = unit_columns(student), t = unit_columns(teacher);
    B = s.size(0), C = s.size(1);
    factor = reduction == Reduction::kBatchMean ? 1.0 / double(B)
             : reduction == Reduction::kMean    ? 1.0 / (double(B) * double(C))
                                                : 1.0;
  }

  static at::Tensor unit_columns(const at::Tensor& x) {
    return (x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous();
  }
  at::ScalarType acc() const { return acc_type(s.scalar_type()); }
  bool reduced() const { return reduction != Reduction::kNone; }
  // loss: (B,) rows for "none", else 0-d, in the logits' dtype. total: D, 0-d in the accumulation
  // dtype ((0,) for "none"), kept for the bound's gradient.
  at::Tensor new_loss() const { return reduced() ? at::empty({}, s.options()) : at::empty({B}, s.options()); }
  at::Tensor new_total() const {
    return at::empty(reduced() ? at::IntArrayRef{} : at::IntArrayRef{0}, s.options().dtype(acc()));
  }
  at::Tensor new_grad(bool wanted) const {
    return at::empty(wanted ? at::IntArrayRef{B, C} : at::IntArrayRef{0}, s.options());
  }
};

// The backward's grad_output as the kernels read it: element b * stride (stride 0 when reduced).
inline int64_t grad_stride(const at::Tensor& grad, const LogitLossArgs& a, const char* op) {
  TORCH_CHECK_VALUE(grad.device() == a.s.device(), op, ": grad_loss must be on ", a.s.device());
  if (a.reduced()) {
    TORCH_CHECK_VALUE(grad.numel() == 1, op, ": grad_loss must hold one value, got shape ", grad.sizes());
    return 0;
  }
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == a.B, op, ": grad_loss must have shape (", a.B, "), got ",
                    grad.sizes());
  return grad.stride(0);
}

inline void check_kl_stats(const at::Tensor& stats, const LogitLossArgs& a, const char* op) {
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == kKlStats && stats.size(1) == a.B && stats.is_contiguous() &&
                        stats.scalar_type() == a.acc() && stats.device() == a.s.device(),
                    op, ": row_stats must be the forward's contiguous (", int(kKlStats), ", B) statistics in ",
                    a.acc(), ", got shape ", stats.sizes(), " and dtype ", stats.scalar_type());
}

inline void check_total(const at::Tensor& total, const LogitLossArgs& a, const char* op) {
  TORCH_CHECK_VALUE(!a.reduced() || (total.numel() == 1 && total.scalar_type() == a.acc() &&
                                     total.device() == a.s.device()),
                    op, ": total must be the forward's 0-d ", a.acc(), " D, got shape ", total.sizes());
}

// ---- per-row math, shared by the CPU and CUDA kernels ----

// Online softmax pair with the KL cross term: maxima m, sums S = sum e^(x - m) and
// W = sum e^(xt - mt) ((xt - mt) - (xs - ms)); all rescaled when a maximum moves.
template <typename acc_t>
struct KlState {
  acc_t ms, ss, mt, st, w;

  MADFAST_HD static KlState empty() {
    const acc_t ninf = -INFINITY;
    return {ninf, acc_t(0), ninf, acc_t(0), acc_t(0)};
  }
  // Moves the maxima to (nms, nmt) >= (ms, mt).
  MADFAST_HD void rescale(acc_t nms, acc_t nmt) {
    if (st > acc_t(0)) {  // an empty state (-inf, 0) has nothing to rescale
      const acc_t at = std::exp(mt - nmt);
      w = at * (w + st * ((mt - nmt) - (ms - nms)));
      st *= at;
    }
    if (ss > acc_t(0)) ss *= std::exp(ms - nms);
    ms = nms, mt = nmt;
  }
  // Adds one element (x already divided by T), maxima already covering it.
  MADFAST_HD void add(acc_t xs, acc_t xt) {
    const acc_t ds = xs - ms, dt = xt - mt, et = std::exp(dt);
    ss += std::exp(ds);
    st += et;
    w += et * (dt - ds);
  }
  MADFAST_HD void merge(KlState o) {
    const acc_t nms = ms > o.ms ? ms : o.ms, nmt = mt > o.mt ? mt : o.mt;
    rescale(nms, nmt);
    o.rescale(nms, nmt);
    ss += o.ss, st += o.st, w += o.w;
  }
  MADFAST_HD acc_t kl() const { return w / st - std::log(st) + std::log(ss); }
};

// d row_i / d s_j and d row_i / d t_j scaled by g (grad_output times the reduction's chain rule),
// from the saved statistics: T (p_s - p_t) and T p_t (log p_t - log p_s - KL).
template <typename acc_t>
MADFAST_HD void kl_grads(acc_t xs, acc_t xt, acc_t ms, acc_t log_s, acc_t mt, acc_t log_t, acc_t kl, acc_t g_tau,
                         acc_t& gs, acc_t& gt) {
  const acc_t lps = (xs - ms) - log_s, lpt = (xt - mt) - log_t, pt = std::exp(lpt);
  gs = g_tau * (std::exp(lps) - pt);
  gt = g_tau * pt * ((lpt - lps) - kl);
}

// The reduced loss sign * min(D, bound) and the factor its gradient passes on: sign where
// D <= bound (torch.clamp's rule), 0 past it.
template <typename acc_t>
MADFAST_HD acc_t bounded(acc_t d, bool has_bound, acc_t bound, acc_t sign) {
  return sign * (has_bound && d > bound ? bound : d);
}
template <typename acc_t>
MADFAST_HD acc_t bounded_grad(acc_t d, bool has_bound, acc_t bound, acc_t sign) {
  return has_bound && d > bound ? acc_t(0) : sign;
}

}  // namespace madfast
