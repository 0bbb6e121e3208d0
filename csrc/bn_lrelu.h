// Shared by the CPU and CUDA kernels of madfast::bn_lrelu (the generator block's tail,
// out = LeakyReLU(y * scale_c + shift_c), BatchNorm folded into scale and shift) and its backward:
// argument checks and the per-element math.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "acc_type.h"
#include "channel_view.h"
#include "host_device.h"

namespace madfast {
namespace bn_lrelu {

template <typename acc_t>
MADFAST_HD acc_t forward(acc_t y, acc_t scale, acc_t shift, acc_t slope) {
  const acc_t z = y * scale + shift;
  return z > 0 ? z : z * slope;
}

// d out / d z times grad: the gradient of z = y * scale + shift, from which the kernels take
// grad_y = gz * scale and accumulate Sum gz * y (grad of scale) and Sum gz (grad of shift).
template <typename acc_t>
MADFAST_HD acc_t grad_z(acc_t grad, acc_t y, acc_t scale, acc_t shift, acc_t slope) {
  return y * scale + shift > 0 ? grad : grad * slope;
}

// y viewed per channel; scale and shift checked and made (C,) in the accumulation dtype.
struct Args {
  ChannelView y;
  at::Tensor scale, shift;

  Args(const char* op, const at::Tensor& y_in, const at::Tensor& scale_in, const at::Tensor& shift_in)
      : y(y_in, op, "y") {
    const auto acc = acc_type(y.x.scalar_type());
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"scale", &scale_in}, {"shift", &shift_in}}) {
      TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == y.C, op, ": ", name, " must have shape (", y.C, ",), got ",
                        t->sizes());
      TORCH_CHECK_VALUE(t->device() == y.x.device(), op, ": ", name, " is on ", t->device(), " but y is on ",
                        y.x.device());
      TORCH_CHECK_TYPE(t->is_floating_point(), op, ": ", name, " must be floating, got ", t->scalar_type());
    }
    scale = scale_in.to(acc).contiguous();
    shift = shift_in.to(acc).contiguous();
  }
};

// grad viewed per channel with its own strides, checked against y.
inline ChannelView grad_view(const char* op, const at::Tensor& grad, const ChannelView& y) {
  TORCH_CHECK_VALUE(grad.sizes() == y.x.sizes(), op, ": grad must have y's shape ", y.x.sizes(), ", got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == y.x.scalar_type(), op, ": grad has dtype ", grad.scalar_type(),
                   " but y has dtype ", y.x.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == y.x.device(), op, ": grad must be on ", y.x.device());
  return ChannelView(grad, op, "grad");
}

}  // namespace bn_lrelu
}  // namespace madfast
