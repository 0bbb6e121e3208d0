// Shared by the CPU and CUDA channel-moment kernels: the checks, and the layers of bn_stat_losses.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

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

// The layers of one bn_stat_losses call: x[l] (N, C_l, H, W) as channel views, running_mean[l] and
// running_var[l] (C_l,); moments of layer l at columns offsets[l] .. offsets[l] + C_l of a (2, total_c)
// tensor. Accumulation in fp32, fp64 when an input is fp64.
struct BnLayers {
  std::vector<ChannelView> views;
  std::vector<int64_t> offsets;
  int64_t total_c = 0;
  at::ScalarType acc = at::kFloat;

  BnLayers(at::TensorList xs, at::TensorList rms, at::TensorList rvs, const char* op) {
    TORCH_CHECK_VALUE(!xs.empty(), op, ": x must hold at least one tensor");
    TORCH_CHECK_VALUE(rms.size() == xs.size() && rvs.size() == xs.size(), op, ": x has ", xs.size(),
                      " tensors but running_mean has ", rms.size(), " and running_var ", rvs.size());
    for (size_t l = 0; l < xs.size(); ++l) {
      const std::string name = "x[" + std::to_string(l) + "]";
      views.emplace_back(xs[l], op, name.c_str());
      const ChannelView& v = views.back();
      for (const auto& [what, t] : {std::pair{"running_mean", &rms[l]}, std::pair{"running_var", &rvs[l]}}) {
        TORCH_CHECK_TYPE(t->is_floating_point(), op, ": ", what, "[", l, "] must be floating, got ", t->scalar_type());
        TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == v.C, op, ": ", what, "[", l, "] has shape ", t->sizes(),
                          " but ", name, " has ", v.C, " channels");
        TORCH_CHECK_VALUE(t->device() == v.x.device(), op, ": ", what, "[", l, "] is on ", t->device(), " but ",
                          name, " is on ", v.x.device());
      }
      TORCH_CHECK_VALUE(v.x.device() == xs[0].device(), op, ": every x must be on one device, got ", xs[0].device(),
                        " and ", v.x.device());
      if (v.x.scalar_type() == at::kDouble) acc = at::kDouble;
      offsets.push_back(total_c);
      total_c += v.C;
    }
  }

  int64_t size() const { return int64_t(views.size()); }
  at::TensorOptions options() const { return views[0].x.options().dtype(acc); }

  void check_saved(const at::Tensor& grad, const at::Tensor& moments, const at::Tensor& norms, const char* op) const {
    TORCH_CHECK_VALUE(grad.numel() == 1, op, ": grad_loss must hold one value, got shape ", grad.sizes());
    TORCH_CHECK_VALUE(moments.dim() == 2 && moments.size(0) == 2 && moments.size(1) == total_c &&
                          moments.is_contiguous() && moments.scalar_type() == acc,
                      op, ": moments must be the forward's contiguous (2, ", total_c, ") ", acc, " tensor, got ",
                      moments.sizes());
    TORCH_CHECK_VALUE(norms.dim() == 2 && norms.size(0) == 2 && norms.size(1) == size() && norms.is_contiguous() &&
                          norms.scalar_type() == acc,
                      op, ": norms must be the forward's contiguous (2, ", size(), ") ", acc, " tensor, got ",
                      norms.sizes());
  }
};

}  // namespace madfast
