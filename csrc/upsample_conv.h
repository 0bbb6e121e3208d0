// Shared by the CPU and CUDA kernels of madfast::upsample_conv (conv3x3 of a bilinear x2 upsample,
// align_corners=True as nn.UpsamplingBilinear2d): the host-side checks and geometry, and the
// per-element math both devices run, so that the CPU build tests what the CUDA kernels compute.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "acc_type.h"
#include "host_device.h"

namespace madfast {
namespace upsample {

// Sizes and strides of one call. x (N, Cin, H, W) and y / grad_y (N, Cout, OH = 2H, OW = 2W) are
// read through their own strides, so contiguous, channels_last and strided views need no copy.
template <typename acc_t>
struct Geometry {
  int64_t N, Cin, H, W, Cout, OH, OW;
  acc_t scale_h, scale_w;  // source index per up-sampled index: (in - 1) / (out - 1)
  int64_t sxN, sxC, sxH, sxW;
};

// The two low-resolution indices an up-sampled index u reads, and the weight of the second
// (torch's upsample_bilinear2d: src = u * scale, lo = floor(src), hi = min(lo + 1, size - 1)).
template <typename acc_t>
struct Tap {
  int64_t lo, hi;
  acc_t frac;
};

template <typename acc_t>
MADFAST_HD Tap<acc_t> tap(int64_t u, acc_t scale, int64_t size) {
  const acc_t src = static_cast<acc_t>(u) * scale;
  int64_t lo = static_cast<int64_t>(src);
  if (lo > size - 1) lo = size - 1;
  return {lo, lo + (lo < size - 1 ? 1 : 0), src - static_cast<acc_t>(lo)};
}

// upsample_x2(x)[n, c, u, v] with `plane` = x + n*sxN + c*sxC; 0 outside the image (the conv's padding).
template <typename scalar_t, typename acc_t>
MADFAST_HD acc_t upsampled(const scalar_t* plane, int64_t u, int64_t v, const Geometry<acc_t>& g) {
  if (u < 0 || u >= g.OH || v < 0 || v >= g.OW) return acc_t(0);
  const Tap<acc_t> th = tap(u, g.scale_h, g.H), tw = tap(v, g.scale_w, g.W);
  const acc_t x00 = static_cast<acc_t>(plane[th.lo * g.sxH + tw.lo * g.sxW]);
  const acc_t x01 = static_cast<acc_t>(plane[th.lo * g.sxH + tw.hi * g.sxW]);
  const acc_t x10 = static_cast<acc_t>(plane[th.hi * g.sxH + tw.lo * g.sxW]);
  const acc_t x11 = static_cast<acc_t>(plane[th.hi * g.sxH + tw.hi * g.sxW]);
  return (1 - th.frac) * ((1 - tw.frac) * x00 + tw.frac * x01) + th.frac * ((1 - tw.frac) * x10 + tw.frac * x11);
}

// The weight with which low-resolution index i enters up-sampled index u (the bilinear adjoint).
template <typename acc_t>
MADFAST_HD acc_t tap_weight(int64_t u, int64_t i, acc_t scale, int64_t size) {
  const Tap<acc_t> t = tap(u, scale, size);
  return (t.lo == i ? 1 - t.frac : acc_t(0)) + (t.hi == i ? t.frac : acc_t(0));
}

// The up-sampled rows that read low-resolution row h: src = u (H-1)/(2H-1) puts them in
// [2h - 2, 2h + 3] (clipped to the image) -- a tile of rows [h0, h1) needs [2 h0 - 2, 2 h1 + 1].
MADFAST_HD int64_t first_reader(int64_t h) { return h > 0 ? 2 * h - 2 : 0; }
MADFAST_HD int64_t last_reader(int64_t h, int64_t out_size) { return 2 * h + 3 < out_size ? 2 * h + 3 : out_size - 1; }

// What the backward reads as grad_y: with train-mode BatchNorm on y, the gradients of its sums
// (d Sum y / dy = 1, d Sum y^2 / dy = 2y) are folded in as each element is read, so no
// temporary of y's size is written for them.
template <typename scalar_t, typename acc_t>
struct GradY {
  const scalar_t* g;  // (N, Cout, OH, OW) at strides sg*
  const scalar_t* y;  // same shape at strides sy*, or null when nothing is folded
  const acc_t* g_sum;  // (Cout,) or null
  const acc_t* g_sumsq;  // (Cout,) or null
  int64_t sgN, sgC, sgH, sgW, syN, syC, syH, syW;

  // grad_y[n, c, r, col], 0 outside the image (the transposed conv's padding).
  MADFAST_HD acc_t operator()(int64_t n, int64_t c, int64_t r, int64_t col, int64_t OH, int64_t OW) const {
    if (r < 0 || r >= OH || col < 0 || col >= OW) return acc_t(0);
    acc_t v = static_cast<acc_t>(g[n * sgN + c * sgC + r * sgH + col * sgW]);
    if (g_sum) v += static_cast<acc_t>(g_sum[c]);
    if (g_sumsq) v += 2 * static_cast<acc_t>(y[n * syN + c * syC + r * syH + col * syW]) * static_cast<acc_t>(g_sumsq[c]);
    return v;
  }
};

// ---- host side ------------------------------------------------------------------------------

inline void check_forward(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(x.dim() == 4, "upsample_conv: x must be 4-D (N, Cin, H, W), got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.is_floating_point(), "upsample_conv: x must be floating, got ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == 3 && weight.size(3) == 3,
                    "upsample_conv: weight must have shape (Cout, ", x.size(1), ", 3, 3), got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "upsample_conv: weight has dtype ",
                   weight.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "upsample_conv: weight is on ", weight.device(), " but x is on ",
                    x.device());
}

inline at::MemoryFormat layout_of(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

// The forward's outputs, allocated for the kernels to fill (after checking x and weight):
// y (N, Cout, 2H, 2W) in x's dtype and layout, and the zeroed Sum y, Sum y^2 ((Cout,), or empty
// unless stats) in the accumulation dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_outputs(const at::Tensor& x, const at::Tensor& weight,
                                                                      bool stats) {
  check_forward(x, weight);
  const int64_t Cout = weight.size(0);
  at::Tensor y = at::empty({x.size(0), Cout, 2 * x.size(2), 2 * x.size(3)}, x.options().memory_format(layout_of(x)));
  const auto sum_options = x.options().dtype(acc_type(x.scalar_type()));
  return {y, at::zeros({stats ? Cout : 0}, sum_options), at::zeros({stats ? Cout : 0}, sum_options)};
}

template <typename acc_t>
Geometry<acc_t> geometry(const at::Tensor& x, int64_t Cout) {
  const int64_t H = x.size(2), W = x.size(3);
  // align_corners=True: scale (in - 1) / (out - 1), computed as torch does before the cast.
  const auto scale = [](int64_t in) { return static_cast<acc_t>(static_cast<double>(in - 1) / (2 * in - 1)); };
  return {x.size(0), x.size(1), H, W, Cout, 2 * H, 2 * W, scale(H), scale(W),
          x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

// The backward's grad_y view; y, grad_sum and grad_sumsq checked, the latter two made (Cout,)
// in the accumulation dtype (fp32, fp64 for fp64).
struct GradYArgs {
  at::Tensor g_sum, g_sumsq;
  bool fold_sum, fold_sumsq;

  GradYArgs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& y,
            const std::optional<at::Tensor>& grad_sum, const std::optional<at::Tensor>& grad_sumsq) {
    check_forward(x, weight);
    const std::vector<int64_t> out_shape{x.size(0), weight.size(0), 2 * x.size(2), 2 * x.size(3)};
    TORCH_CHECK_VALUE(grad_y.sizes() == at::IntArrayRef(out_shape), "upsample_conv_backward: grad_y must have shape ",
                      at::IntArrayRef(out_shape), ", got ", grad_y.sizes());
    TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), "upsample_conv_backward: grad_y has dtype ",
                     grad_y.scalar_type(), " but x has dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(grad_y.device() == x.device(), "upsample_conv_backward: grad_y must be on ", x.device());
    const auto per_channel = [&](const std::optional<at::Tensor>& t, const char* name) {
      if (!t.has_value() || t->numel() == 0) return at::Tensor();
      TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == weight.size(0), "upsample_conv_backward: ", name,
                        " must have shape (", weight.size(0), ",), got ", t->sizes());
      TORCH_CHECK_VALUE(t->device() == x.device(), "upsample_conv_backward: ", name, " must be on ", x.device());
      return t->to(acc_type(x.scalar_type())).contiguous();
    };
    g_sum = per_channel(grad_sum, "grad_sum");
    g_sumsq = per_channel(grad_sumsq, "grad_sumsq");
    fold_sum = g_sum.defined();
    fold_sumsq = g_sumsq.defined();
    if (fold_sumsq) {
      TORCH_CHECK_VALUE(y.has_value() && y->sizes() == grad_y.sizes() && y->scalar_type() == x.scalar_type() &&
                            y->device() == x.device(),
                        "upsample_conv_backward: y (the forward's output) must be given, with grad_y's shape, dtype ",
                        "and device, when grad_sumsq is");
    }
  }

  template <typename scalar_t, typename acc_t>
  GradY<scalar_t, acc_t> view(const at::Tensor& grad_y, const std::optional<at::Tensor>& y) const {
    const at::Tensor& yy = fold_sumsq ? *y : grad_y;
    return {grad_y.const_data_ptr<scalar_t>(), fold_sumsq ? yy.const_data_ptr<scalar_t>() : nullptr,
            fold_sum ? g_sum.const_data_ptr<acc_t>() : nullptr, fold_sumsq ? g_sumsq.const_data_ptr<acc_t>() : nullptr,
            grad_y.stride(0), grad_y.stride(1), grad_y.stride(2), grad_y.stride(3),
            yy.stride(0), yy.stride(1), yy.stride(2), yy.stride(3)};
  }
};

}  // namespace upsample
}  // namespace madfast
