// CPU kernels of madfast::upsample_conv and its backward: the host twin of csrc/cuda/upsample_conv.cu,
// built on the same per-element math (upsample_conv.h), so the CPU tests check what the GPU runs.
// One output row at a time: the three up-sampled rows a 3x3 conv reads are interpolated into a
// small buffer (never the whole 4x tensor), then the row's GEMM runs over it with the inner loop
// along the row, which the compiler vectorizes. Work is split into one part per thread and the
// per-part sums are added in part order, so results do not depend on scheduling.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "upsample_conv.h"

namespace madfast {
namespace {

using upsample::Geometry;

// Runs body(part, begin, end) over [0, total) split into one contiguous range per thread.
template <typename F>
int64_t for_each_part(int64_t total, const F& body) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) body(p, p * total / parts, (p + 1) * total / parts);
  });
  return parts;
}

// up[(ci * 3 + kh) * (OW + 2) + 1 + v] = upsample_x2(x)[n, ci, oh + kh - 1, v] for v in [-1, OW], 0 in padding.
template <typename scalar_t, typename acc_t>
void upsampled_rows(const scalar_t* x, int64_t n, int64_t oh, const Geometry<acc_t>& g, acc_t* up) {
  for (int64_t ci = 0; ci < g.Cin; ++ci) {
    const scalar_t* plane = x + n * g.sxN + ci * g.sxC;
    for (int64_t kh = 0; kh < 3; ++kh) {
      acc_t* row = up + (ci * 3 + kh) * (g.OW + 2);
      for (int64_t v = -1; v <= g.OW; ++v) row[v + 1] = upsample::upsampled(plane, oh + kh - 1, v, g);
    }
  }
}

template <typename scalar_t>
void forward_cpu(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, at::Tensor& total, at::Tensor& total_sq) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto g = upsample::geometry<acc_t>(x, weight.size(0));
  const at::Tensor w = weight.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();  // (Cout, Cin*9)
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* wp = w.const_data_ptr<acc_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t K = g.Cin * 9, rows = g.N * g.OH;
  const int64_t syN = y.stride(0), syC = y.stride(1), syH = y.stride(2), syW = y.stride(3);
  const bool stats = total.numel() > 0;
  // per part: Sum y and Sum y^2 per channel, in double
  std::vector<double> partial(stats ? 2 * g.Cout * std::max<int64_t>(1, at::get_num_threads()) : 0, 0.0);
  const int64_t parts = for_each_part(rows, [&](int64_t part, int64_t r0, int64_t r1) {
    std::vector<acc_t> up(g.Cin * 3 * (g.OW + 2)), acc(g.OW);
    double* s = stats ? partial.data() + 2 * g.Cout * part : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.OH, oh = r % g.OH;
      upsampled_rows(xp, n, oh, g, up.data());
      for (int64_t co = 0; co < g.Cout; ++co) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t k = 0; k < K; ++k) {  // k = (ci, kh, kw)
          const acc_t wk = wp[co * K + k];
          const acc_t* in = up.data() + (k / 3) * (g.OW + 2) + k % 3;
          for (int64_t ow = 0; ow < g.OW; ++ow) acc[ow] += wk * in[ow];
        }
        scalar_t* out = yp + n * syN + co * syC + oh * syH;
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const scalar_t v = static_cast<scalar_t>(acc[ow]);
          out[ow * syW] = v;
          if (stats) {  // BatchNorm's statistics of the stored (rounded) values
            s[co] += double(v);
            s[g.Cout + co] += double(v) * double(v);
          }
        }
      }
    }
  });
  if (stats) {
    acc_t* out[2] = {total.data_ptr<acc_t>(), total_sq.data_ptr<acc_t>()};
    for (int64_t c = 0; c < 2 * g.Cout; ++c) {
      double sum = 0;
      for (int64_t p = 0; p < parts; ++p) sum += partial[2 * g.Cout * p + c];
      out[c / g.Cout][c % g.Cout] = static_cast<acc_t>(sum);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> upsample_conv_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                 bool stats) {
  at::Tensor y, total, total_sq;  // named, not structured bindings: the dispatch lambda captures them
  std::tie(y, total, total_sq) = upsample::forward_outputs(x, weight, stats);
  if (y.numel()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_conv_cpu",
                                    [&] { forward_cpu<scalar_t>(x, weight, y, total, total_sq); });
  }
  return {y, total, total_sq};
}

// grad_w[co, ci, kh, kw] = Sum_{n, oh, ow} grad_y[n, co, oh, ow] * upsample_x2(x)[n, ci, oh + kh - 1, ow + kw - 1]
template <typename scalar_t>
at::Tensor grad_weight_cpu(const upsample::GradY<scalar_t, at::opmath_type<scalar_t>>& gy, const at::Tensor& x,
                           int64_t Cout) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto g = upsample::geometry<acc_t>(x, Cout);
  const int64_t K = g.Cin * 9, rows = g.N * g.OH;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  std::vector<acc_t> partial(Cout * K * std::max<int64_t>(1, at::get_num_threads()), acc_t(0));
  const int64_t parts = for_each_part(rows, [&](int64_t part, int64_t r0, int64_t r1) {
    std::vector<acc_t> up(g.Cin * 3 * (g.OW + 2)), grow(g.OW);
    acc_t* gw = partial.data() + Cout * K * part;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.OH, oh = r % g.OH;
      upsampled_rows(xp, n, oh, g, up.data());
      for (int64_t co = 0; co < Cout; ++co) {
        for (int64_t ow = 0; ow < g.OW; ++ow) grow[ow] = gy(n, co, oh, ow, g.OH, g.OW);
        for (int64_t k = 0; k < K; ++k) {
          const acc_t* in = up.data() + (k / 3) * (g.OW + 2) + k % 3;
          acc_t dot = 0;
          for (int64_t ow = 0; ow < g.OW; ++ow) dot += grow[ow] * in[ow];
          gw[co * K + k] += dot;
        }
      }
    }
  });
  at::Tensor out = at::empty({Cout, g.Cin, 3, 3}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* op = out.data_ptr<acc_t>();
  for (int64_t i = 0; i < Cout * K; ++i) {
    acc_t total = 0;
    for (int64_t p = 0; p < parts; ++p) total += partial[Cout * K * p + i];
    op[i] = total;
  }
  return out;
}

// grad_x = bilinear adjoint of conv_transpose(grad_y), a block of kRows input rows at a time: the
// up-sampled gradient rows that block reads are computed once into a buffer (recomputed only
// for the rows shared with the neighbouring block), never for the whole image.
constexpr int64_t kRows = 8;

template <typename scalar_t>
void grad_input_cpu(const upsample::GradY<scalar_t, at::opmath_type<scalar_t>>& gy, const at::Tensor& weight,
                    at::Tensor& gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto g = upsample::geometry<acc_t>(gx, weight.size(0));
  const at::Tensor w = weight.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();  // (Cout, Cin, 3, 3)
  const acc_t* wp = w.const_data_ptr<acc_t>();
  scalar_t* gxp = gx.data_ptr<scalar_t>();
  const int64_t blocks_h = (g.H + kRows - 1) / kRows;
  for_each_part(g.N * blocks_h, [&](int64_t, int64_t b0, int64_t b1) {
    std::vector<acc_t> grow(g.Cout * (g.OW + 2)), gup(g.Cin * g.OW), acc(g.Cin * kRows * g.W);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / blocks_h, h0 = (b % blocks_h) * kRows, h1 = std::min(h0 + kRows, g.H);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t u = upsample::first_reader(h0); u <= upsample::last_reader(h1 - 1, g.OH); ++u) {
        // 1) row u of the up-sampled gradient: conv_transpose, gup[ci, v] = Sum w[co, ci, kh, kw] grad_y[co, u + 1 - kh, v + 1 - kw]
        std::fill(gup.begin(), gup.end(), acc_t(0));
        for (int64_t kh = 0; kh < 3; ++kh) {
          const int64_t r = u + 1 - kh;
          if (r < 0 || r >= g.OH) continue;
          for (int64_t co = 0; co < g.Cout; ++co)
            for (int64_t c = -1; c <= g.OW; ++c) grow[co * (g.OW + 2) + c + 1] = gy(n, co, r, c, g.OH, g.OW);
          for (int64_t co = 0; co < g.Cout; ++co)
            for (int64_t ci = 0; ci < g.Cin; ++ci)
              for (int64_t kw = 0; kw < 3; ++kw) {
                const acc_t wk = wp[((co * g.Cin + ci) * 3 + kh) * 3 + kw];
                const acc_t* in = grow.data() + co * (g.OW + 2) + 2 - kw;  // grad_y column v + 1 - kw
                acc_t* out = gup.data() + ci * g.OW;
                for (int64_t v = 0; v < g.OW; ++v) out[v] += wk * in[v];
              }
        }
        // 2) its share of the block's input rows: the bilinear adjoint along rows, then columns
        const auto th = upsample::tap(u, g.scale_h, g.H);
        for (int64_t h = std::max(th.lo, h0); h <= std::min(th.hi, h1 - 1); ++h) {
          const acc_t weight_h = upsample::tap_weight(u, h, g.scale_h, g.H);
          for (int64_t ci = 0; ci < g.Cin; ++ci) {
            acc_t* dst = acc.data() + (ci * kRows + (h - h0)) * g.W;
            const acc_t* src = gup.data() + ci * g.OW;
            for (int64_t v = 0; v < g.OW; ++v) {
              const auto tw = upsample::tap(v, g.scale_w, g.W);
              dst[tw.lo] += weight_h * (1 - tw.frac) * src[v];
              dst[tw.hi] += weight_h * tw.frac * src[v];
            }
          }
        }
      }
      for (int64_t ci = 0; ci < g.Cin; ++ci)
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t wi = 0; wi < g.W; ++wi)
            gxp[n * gx.stride(0) + ci * gx.stride(1) + h * gx.stride(2) + wi * gx.stride(3)] =
                static_cast<scalar_t>(acc[(ci * kRows + (h - h0)) * g.W + wi]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> upsample_conv_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& y,
                                                              const std::optional<at::Tensor>& grad_sum,
                                                              const std::optional<at::Tensor>& grad_sumsq,
                                                              bool grad_input, bool grad_weight) {
  const upsample::GradYArgs args(grad_y, x, weight, y, grad_sum, grad_sumsq);
  at::Tensor gx = grad_input ? at::empty_like(x) : x.new_empty({0});
  at::Tensor gw = grad_weight ? at::zeros_like(weight) : weight.new_empty({0});
  if (x.numel() == 0 || weight.size(0) == 0) return {grad_input ? gx.zero_() : gx, gw};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_conv_backward_cpu", [&] {
    const auto gy = args.view<scalar_t, at::opmath_type<scalar_t>>(grad_y, y);
    if (grad_input) grad_input_cpu<scalar_t>(gy, weight, gx);
    if (grad_weight) gw = grad_weight_cpu<scalar_t>(gy, x, weight.size(0)).to(weight.scalar_type());
  });
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CPU, m) {
  m.impl("upsample_conv", &upsample_conv_cpu);
  m.impl("upsample_conv_backward", &upsample_conv_backward_cpu);
}

}  // namespace madfast
