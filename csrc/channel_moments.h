// Shared by the CPU and CUDA channel-moment kernels: the backward's checks.
#pragma once

#include <ATen/ATen.h>

#include "acc_type.h"
#include "channel_view.h"

namespace madfast {

inline void check_moments_backward(const at::Tensor& grad_mean, const at::Tensor& grad_var, const ChannelView& v,
                                   const at::Tensor& mean) {
  for (const at::Tensor* g : {&grad_mean, &grad_var, &mean}) {
    TORCH_CHECK_VALUE(g->dim() == 1 && g->size(0) == v.C, "channel_moments_backward: per-channel inputs must have ",
                      v.C, " entries, got shape ", g->sizes());
    TORCH_CHECK_VALUE(g->device() == v.x.device(), "channel_moments_backward: all inputs must be on ", v.x.device());
  }
}

}  // namespace madfast
