// CPU kernels of madfast::bn_lrelu and its backward, one plane (n, c) or channel at a time;
// the host twin of csrc/cuda/bn_lrelu.cuh.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "bn_lrelu.h"

namespace madfast {
namespace {

at::Tensor bn_lrelu_cpu(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, double slope) {
  const bn_lrelu::Args a("bn_lrelu", y, scale, shift);
  const ChannelView& v = a.y;
  at::Tensor out = at::empty_like(v.x);  // same strides as v.x
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_lrelu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = v.x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t* sc = a.scale.const_data_ptr<acc_t>();
    const acc_t* sh = a.shift.const_data_ptr<acc_t>();
    at::parallel_for(0, v.N * v.C, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t n = j / v.C, c = j % v.C, base = n * v.sN + c * v.sC;
        for (int64_t i = 0; i < v.HW; ++i) {
          const int64_t k = base + i * v.sHW;
          op[k] = static_cast<scalar_t>(bn_lrelu::forward(acc_t(yp[k]), sc[c], sh[c], acc_t(slope)));
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_lrelu_backward_cpu(const at::Tensor& grad, const at::Tensor& y,
                                                                     const at::Tensor& scale, const at::Tensor& shift,
                                                                     double slope) {
  const bn_lrelu::Args a("bn_lrelu_backward", y, scale, shift);
  const ChannelView& v = a.y;
  const ChannelView gv = bn_lrelu::grad_view("bn_lrelu_backward", grad, v);
  at::Tensor gy = at::empty_like(v.x), g_scale = at::empty_like(a.scale), g_shift = at::empty_like(a.shift);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_lrelu_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = v.x.const_data_ptr<scalar_t>();
    const scalar_t* gp = gv.x.const_data_ptr<scalar_t>();
    scalar_t* out = gy.data_ptr<scalar_t>();
    const acc_t* sc = a.scale.const_data_ptr<acc_t>();
    const acc_t* sh = a.shift.const_data_ptr<acc_t>();
    acc_t* gsc = g_scale.data_ptr<acc_t>();
    acc_t* gsh = g_shift.data_ptr<acc_t>();
    at::parallel_for(0, v.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double s_scale = 0, s_shift = 0;  // in double: a channel sums N * H * W terms
        for (int64_t n = 0; n < v.N; ++n)
          for (int64_t i = 0; i < v.HW; ++i) {
            const int64_t k = n * v.sN + c * v.sC + i * v.sHW;
            const acc_t yv = acc_t(yp[k]);
            const acc_t gz = bn_lrelu::grad_z(acc_t(gp[n * gv.sN + c * gv.sC + i * gv.sHW]), yv, sc[c], sh[c],
                                              acc_t(slope));
            out[k] = static_cast<scalar_t>(gz * sc[c]);
            s_scale += double(gz) * double(yv);
            s_shift += double(gz);
          }
        gsc[c] = acc_t(s_scale);
        gsh[c] = acc_t(s_shift);
      }
    });
  });
  return {gy, g_scale, g_shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(madfast, CPU, m) {
  m.impl("bn_lrelu", &bn_lrelu_cpu);
  m.impl("bn_lrelu_backward", &bn_lrelu_backward_cpu);
}

}  // namespace madfast
