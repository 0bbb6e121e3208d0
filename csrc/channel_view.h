// A 4-D tensor as (N, C, HW) with strides, for the per-channel kernels (channel moments, bn_lrelu).
#pragma once

#include <ATen/ATen.h>

namespace madfast {

// x as (N, C, HW) with strides: contiguous and channels_last as they are, anything else copied.
struct ChannelView {
  at::Tensor x;
  int64_t N, C, HW, sN, sC, sHW;

  ChannelView(const at::Tensor& input, const char* op, const char* name) {
    TORCH_CHECK_VALUE(input.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got shape ", input.sizes());
    TORCH_CHECK_TYPE(input.is_floating_point(), op, ": ", name, " must be floating, got ", input.scalar_type());
    const bool cl = input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous();
    x = (input.is_contiguous() || cl) ? input : input.contiguous();
    N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
    sN = x.stride(0), sC = x.stride(1), sHW = x.stride(3);
    if (x.size(3) == 1) sHW = cl ? C : 1;  // a size-1 dim may carry any stride
  }

  bool channels_last() const { return sC == 1 && C > 1; }
};

}  // namespace madfast
