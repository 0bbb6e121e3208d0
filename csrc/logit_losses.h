// Shared by the CPU and CUDA per-row logit-loss kernels: checks and output allocation.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "acc_type.h"

namespace madfast {

inline void check_logits(const at::Tensor& s, const at::Tensor& t, const char* op) {
  TORCH_CHECK_VALUE(s.dim() == 2, op, ": student_logits must be 2-D (B, C), got shape ", s.sizes());
  TORCH_CHECK_VALUE(t.sizes() == s.sizes(), op, ": teacher_logits has shape ", t.sizes(), " but student_logits has ",
                    s.sizes());
  TORCH_CHECK_TYPE(s.is_floating_point() && t.scalar_type() == s.scalar_type(), op,
                   ": logits must share one floating dtype, got ", s.scalar_type(), " and ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == s.device(), op, ": logits must be on one device, got ", s.device(), " and ",
                    t.device());
}

// The kernels read rows with unit column stride (any row stride).
inline at::Tensor rows_unit_stride(const at::Tensor& x) {
  return (x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous();
}

inline at::ScalarType loss_dtype(const at::Tensor& x) {
  return acc_type(x.scalar_type());
}

inline at::Tensor grad_or_empty(const at::Tensor& x, bool wanted) {
  return wanted ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                : at::empty({0}, x.options());
}

}  // namespace madfast
