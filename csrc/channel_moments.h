// Shared by the CPU and CUDA channel-moment kernels: checks and the (N, C, HW) stride view.
#pragma once

#include <ATen/ATen.h>

namespace madfast {

// x as (N, C, HW) with strides: contiguous and channels_last as they are, anything else copied.
struct MomentsView {
  at::Tensor x;
  int64_t N, C, HW, sN, sC, sHW;

  explicit MomentsView(const at::Tensor& input) {
    TORCH_CHECK_VALUE(input.dim() == 4, "channel_moments: x must be 4-D (N, C, H, W), got shape ", input.sizes());
    TORCH_CHECK_TYPE(input.is_floating_point(), "channel_moments: x must be floating, got ", input.scalar_type());
    const bool cl = input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous();
    x = (input.is_contiguous() || cl) ? input : input.contiguous();
    N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
    sN = x.stride(0), sC = x.stride(1), sHW = x.stride(3);
    if (x.size(3) == 1) sHW = cl ? C : 1;  // a size-1 dim may carry any stride
  }

  bool channels_last() const { return sC == 1 && C > 1; }
};

inline void check_moments_backward(const at::Tensor& grad_mean, const at::Tensor& grad_var, const MomentsView& v,
                                   const at::Tensor& mean) {
  for (const at::Tensor* g : {&grad_mean, &grad_var, &mean}) {
    TORCH_CHECK_VALUE(g->dim() == 1 && g->size(0) == v.C, "channel_moments_backward: per-channel inputs must have ",
                      v.C, " entries, got shape ", g->sizes());
    TORCH_CHECK_VALUE(g->device() == v.x.device(), "channel_moments_backward: all inputs must be on ", v.x.device());
  }
}

}  // namespace madfast
