// CPU kernels of madfast::channel_moments (per-channel mean and biased variance) and its backward,
// and of madfast::bn_stat_losses (DeepInversion's BN loss over many layers at once, penalties
// folded in) and its backward.
// Moments: split into runs of at most kChunk elements (contiguous H*W runs for NCHW; for
// channels_last, tiles of kRows positions read along C), each run's (count, mean, M2) computed in
// two passes in cache, in fp32 (fp64 only for fp64 inputs), then combined with Chan's formula in a
// fixed order: results do not depend on the thread count. Every value is taken less a pivot, its
// channel's first value, and the pivot added back at the end, so that the sums and the merges of
// run means stay of the size of the spread: |mean| >> std neither cancels nor rounds the variance
// away (one-value runs, H*W = 1, included).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "channel_moments.h"
#include "cpu_vectorize.h"

namespace madfast {
namespace {

constexpr int64_t kChunk = 2048;  // elements per run (NCHW)
constexpr int64_t kRows = 64;     // positions per tile (channels_last)
constexpr int kLanes = 8;

template <typename acc_t>
struct Moments {
  int64_t n = 0;
  acc_t mean = 0, m2 = 0;
};

// Chan et al.: the moments of the union of two disjoint sets.
template <typename acc_t>
void merge(Moments<acc_t>& a, const Moments<acc_t>& b) {
  if (b.n == 0) return;
  if (a.n == 0) {
    a = b;
    return;
  }
  const int64_t n = a.n + b.n;
  const acc_t fb = acc_t(b.n) / acc_t(n), d = b.mean - a.mean;
  a.mean += d * fb;
  a.m2 += b.m2 + d * d * acc_t(a.n) * fb;
  a.n = n;
}

// One contiguous run less the pivot: its mean, then the deviations from that mean (the second pass,
// with Σd² − (Σd)²/n, corrects the mean's rounding).
template <typename scalar_t, typename acc_t>
MADFAST_CPU_CLONES Moments<acc_t> run_moments(const scalar_t* __restrict__ p, int64_t len, acc_t pivot) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += acc_t(p[i + j]) - pivot;
  acc_t sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += lanes[j];
  for (; i < len; ++i) sum += acc_t(p[i]) - pivot;
  const acc_t m = sum / acc_t(len);
  acc_t l1[kLanes] = {}, l2[kLanes] = {};
  for (i = 0; i + kLanes <= len; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const acc_t d = acc_t(p[i + j]) - pivot - m;
      l1[j] += d, l2[j] += d * d;
    }
  acc_t s1 = 0, s2 = 0;
  for (int j = 0; j < kLanes; ++j) s1 += l1[j], s2 += l2[j];
  for (; i < len; ++i) {
    const acc_t d = acc_t(p[i]) - pivot - m;
    s1 += d, s2 += d * d;
  }
  return {len, m + s1 / acc_t(len), std::max(acc_t(0), s2 - s1 * s1 / acc_t(len))};
}

// A tile of rows positions x C channels (channels_last: C contiguous per position), less the
// channels' pivots, into per-channel moments, the two passes vectorized along C.
template <typename scalar_t, typename acc_t>
MADFAST_CPU_CLONES void tile_moments(const scalar_t* __restrict__ p, int64_t rows, int64_t C, int64_t row_stride,
                                     const acc_t* __restrict__ pivot, acc_t* __restrict__ sum,
                                     acc_t* __restrict__ s1, acc_t* __restrict__ s2) {
  std::fill(sum, sum + C, acc_t(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) sum[c] += acc_t(p[r * row_stride + c]) - pivot[c];
  const acc_t inv = acc_t(1) / acc_t(rows);
  for (int64_t c = 0; c < C; ++c) sum[c] *= inv;  // now the tile's mean
  std::fill(s1, s1 + C, acc_t(0));
  std::fill(s2, s2 + C, acc_t(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = acc_t(p[r * row_stride + c]) - pivot[c] - sum[c];
      s1[c] += d, s2[c] += d * d;
    }
}

// layer_moments of the values less the channels' pivots.
template <typename scalar_t, typename acc_t>
void layer_moments_from(const ChannelView& v, const acc_t* pivot, Moments<acc_t>* out) {
  const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
  if (v.channels_last() && v.HW * v.N > 1) {
    // positions (n, hw) are rows of C contiguous values, n-major: row (n, hw) at n*sN + hw*C
    const int64_t tiles_per_n = (v.HW + kRows - 1) / kRows, tiles = v.N * tiles_per_n;
    std::vector<Moments<acc_t>> part(tiles * v.C);
    at::parallel_for(0, tiles, 1, [&](int64_t k0, int64_t k1) {
      std::vector<acc_t> mean(v.C), s1(v.C), s2(v.C);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t n = k / tiles_per_n, r0 = (k % tiles_per_n) * kRows, rows = std::min(kRows, v.HW - r0);
        tile_moments(xp + n * v.sN + r0 * v.C, rows, v.C, v.C, pivot, mean.data(), s1.data(), s2.data());
        for (int64_t c = 0; c < v.C; ++c)
          part[k * v.C + c] = {rows, mean[c] + s1[c] / acc_t(rows),
                               std::max(acc_t(0), s2[c] - s1[c] * s1[c] / acc_t(rows))};
      }
    });
    at::parallel_for(0, v.C, 16, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Moments<acc_t> m;
        for (int64_t k = 0; k < tiles; ++k) merge(m, part[k * v.C + c]);  // fixed order
        out[c] = m;
      }
    });
    return;
  }
  // contiguous (sHW == 1): each (n, c) is a run of HW values
  at::parallel_for(0, v.C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      Moments<acc_t> m;
      for (int64_t n = 0; n < v.N; ++n)
        for (int64_t i = 0; i < v.HW; i += kChunk)
          merge(m, run_moments<scalar_t, acc_t>(xp + n * v.sN + c * v.sC + i, std::min(kChunk, v.HW - i),
                                                pivot[c]));
      out[c] = m;
    }
  });
}

// Per-channel moments of one layer's input into out[c] (count, mean, M2).
template <typename scalar_t, typename acc_t>
void layer_moments(const ChannelView& v, Moments<acc_t>* out) {
  const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
  std::vector<acc_t> pivot(v.C, acc_t(0));  // each channel's value at (n, h, w) = 0
  if (v.N * v.HW > 0)
    for (int64_t c = 0; c < v.C; ++c) pivot[c] = acc_t(xp[c * v.sC]);
  layer_moments_from<scalar_t>(v, pivot.data(), out);
  for (int64_t c = 0; c < v.C; ++c) out[c].mean += pivot[c];
}

template <typename acc_t>
void store_moments(const std::vector<Moments<acc_t>>& m, acc_t* mean, acc_t* var) {
  for (size_t c = 0; c < m.size(); ++c) {
    mean[c] = m[c].n ? m[c].mean : acc_t(NAN);
    var[c] = m[c].n ? m[c].m2 / acc_t(m[c].n) : acc_t(NAN);
  }
}

std::tuple<at::Tensor, at::Tensor> channel_moments_cpu(const at::Tensor& input) {
  const ChannelView v(input, "channel_moments", "x");
  const auto acc = acc_type(v.x.scalar_type());
  at::Tensor mean = at::empty({v.C}, v.x.options().dtype(acc)), var = at::empty({v.C}, v.x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "channel_moments_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<Moments<acc_t>> m(v.C);
    layer_moments<scalar_t>(v, m.data());
    store_moments(m, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
  });
  return {mean, var};
}

// grad_x = gm_c / M + (2 gv_c / M) (x - mean_c), in x's layout, per (n, c) run or per position row.
template <typename scalar_t, typename acc_t>
void moments_grad(const ChannelView& v, const acc_t* gm, const acc_t* gv, const acc_t* mean, at::Tensor& out) {
  const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const acc_t inv_m = acc_t(1) / acc_t(v.N * v.HW);
  if (v.channels_last()) {
    at::parallel_for(0, v.N * v.HW, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t base = (r / v.HW) * v.sN + (r % v.HW) * v.C;
        for (int64_t c = 0; c < v.C; ++c)
          op[base + c] = static_cast<scalar_t>(gm[c] * inv_m + acc_t(2) * gv[c] * inv_m * (acc_t(xp[base + c]) - mean[c]));
      }
    });
    return;
  }
  at::parallel_for(0, v.N * v.C, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t c = j % v.C, base = (j / v.C) * v.sN + c * v.sC;
      const acc_t a = gm[c] * inv_m, b = acc_t(2) * gv[c] * inv_m, mu = mean[c];
      for (int64_t i = 0; i < v.HW; ++i) op[base + i] = static_cast<scalar_t>(a + b * (acc_t(xp[base + i]) - mu));
    }
  });
}

at::Tensor channel_moments_backward_cpu(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                        const at::Tensor& input, const at::Tensor& mean) {
  const ChannelView v(input, "channel_moments", "x");
  check_moments_backward(grad_mean, grad_var, v, mean);
  at::Tensor out = at::empty_like(v.x);  // same layout as x
  if (v.x.numel() == 0) return out;
  const auto acc = acc_type(v.x.scalar_type());
  const at::Tensor gm = grad_mean.to(acc).contiguous(), gv = grad_var.to(acc).contiguous(),
                   mu = mean.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "channel_moments_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    moments_grad<scalar_t, acc_t>(v, gm.const_data_ptr<acc_t>(), gv.const_data_ptr<acc_t>(),
                                  mu.const_data_ptr<acc_t>(), out);
  });
  return out;
}

// ---- bn_stat_losses: every layer in one call ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_stat_losses_cpu(at::TensorList xs, at::TensorList rms,
                                                                  at::TensorList rvs) {
  const BnLayers layers(xs, rms, rvs, "bn_stat_losses");
  at::Tensor loss = at::empty({}, layers.options()), moments = at::empty({2, layers.total_c}, layers.options());
  at::Tensor norms = at::empty({2, layers.size()}, layers.options());
  AT_DISPATCH_FLOATING_TYPES(layers.acc, "bn_stat_losses_cpu", [&] {
    using acc_t = scalar_t;
    acc_t* mean = moments.data_ptr<acc_t>();
    acc_t* var = mean + layers.total_c;
    acc_t total = 0;
    for (int64_t l = 0; l < layers.size(); ++l) {
      const ChannelView& v = layers.views[l];
      std::vector<Moments<acc_t>> m(v.C);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_layer_moments", [&] {
        layer_moments<scalar_t>(v, m.data());
      });
      const int64_t off = layers.offsets[l];
      store_moments(m, mean + off, var + off);
      const at::Tensor rm = rms[l].to(layers.acc).contiguous(), rv = rvs[l].to(layers.acc).contiguous();
      const acc_t* rmp = rm.const_data_ptr<acc_t>();
      const acc_t* rvp = rv.const_data_ptr<acc_t>();
      acc_t sm = 0, sv = 0;
      for (int64_t c = 0; c < v.C; ++c) {
        sm += (mean[off + c] - rmp[c]) * (mean[off + c] - rmp[c]);
        sv += (var[off + c] - rvp[c]) * (var[off + c] - rvp[c]);
      }
      norms.data_ptr<acc_t>()[l] = std::sqrt(sm);
      norms.data_ptr<acc_t>()[layers.size() + l] = std::sqrt(sv);
      total += std::sqrt(sm) + std::sqrt(sv);
    }
    loss.data_ptr<acc_t>()[0] = total;
  });
  return {loss, moments, norms};
}

std::vector<at::Tensor> bn_stat_losses_backward_cpu(const at::Tensor& grad, at::TensorList xs, at::TensorList rms,
                                                    at::TensorList rvs, const at::Tensor& moments,
                                                    const at::Tensor& norms) {
  const BnLayers layers(xs, rms, rvs, "bn_stat_losses_backward");
  layers.check_saved(grad, moments, norms, "bn_stat_losses_backward");
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(layers.acc, "bn_stat_losses_backward_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t g = grad.to(layers.acc).item<acc_t>();  // CPU memory: no device sync
    const acc_t* mean = moments.const_data_ptr<acc_t>();
    const acc_t* var = mean + layers.total_c;
    for (int64_t l = 0; l < layers.size(); ++l) {
      const ChannelView& v = layers.views[l];
      const int64_t off = layers.offsets[l];
      const at::Tensor rm = rms[l].to(layers.acc).contiguous(), rv = rvs[l].to(layers.acc).contiguous();
      // d||u||/du = u / ||u|| (0 at u = 0, as torch.linalg.vector_norm's backward)
      const acc_t nm = norms.const_data_ptr<acc_t>()[l], nv = norms.const_data_ptr<acc_t>()[layers.size() + l];
      std::vector<acc_t> gm(v.C), gv(v.C);
      for (int64_t c = 0; c < v.C; ++c) {
        gm[c] = nm > 0 ? g * (mean[off + c] - rm.const_data_ptr<acc_t>()[c]) / nm : acc_t(0);
        gv[c] = nv > 0 ? g * (var[off + c] - rv.const_data_ptr<acc_t>()[c]) / nv : acc_t(0);
      }
      at::Tensor gx = at::empty_like(v.x);
      if (gx.numel()) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_layer_grad", [&] {
          using x_acc_t = at::opmath_type<scalar_t>;
          std::vector<x_acc_t> a(v.C), b(v.C), mu(v.C);
          for (int64_t c = 0; c < v.C; ++c) a[c] = x_acc_t(gm[c]), b[c] = x_acc_t(gv[c]), mu[c] = x_acc_t(mean[off + c]);
          moments_grad<scalar_t, x_acc_t>(v, a.data(), b.data(), mu.data(), gx);
        });
      }
      out.push_back(gx);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CPU, m) {
  m.impl("channel_moments", &channel_moments_cpu);
  m.impl("channel_moments_backward", &channel_moments_backward_cpu);
  m.impl("bn_stat_losses", &bn_stat_losses_cpu);
  m.impl("bn_stat_losses_backward", &bn_stat_losses_backward_cpu);
}

}  // namespace madfast
