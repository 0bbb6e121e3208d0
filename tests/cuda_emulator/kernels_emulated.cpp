// madfast's CUDA kernels written as .cuh (csrc/cuda/), host side included, run on CPU tensors
// through the emulator; built by tests/test_cuda_emulated.py.
#include <torch/extension.h>

#include "cuda_emulator.h"
#include "cuda/bn_lrelu.cuh"
#include "cuda/upsample_conv.cuh"

namespace {

struct EmulatedLaunch {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) const {
    cuda_emulator::launch(kernel, grid, block, args...);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight, bool stats) {
  return madfast::upsample::forward_gpu(x, weight, stats, EmulatedLaunch{});
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& y,
                                            const std::optional<at::Tensor>& grad_sum,
                                            const std::optional<at::Tensor>& grad_sumsq, bool grad_input,
                                            bool grad_weight, int64_t sm_count) {
  return madfast::upsample::backward_gpu(grad_y, x, weight, y, grad_sum, grad_sumsq, grad_input, grad_weight,
                                         EmulatedLaunch{}, sm_count);
}

at::Tensor bn_lrelu(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, double slope) {
  return madfast::bn_lrelu::forward_gpu(y, scale, shift, slope, EmulatedLaunch{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_lrelu_backward(const at::Tensor& grad, const at::Tensor& y,
                                                                 const at::Tensor& scale, const at::Tensor& shift,
                                                                 double slope, int64_t sm_count) {
  return madfast::bn_lrelu::backward_gpu(grad, y, scale, shift, slope, EmulatedLaunch{}, sm_count);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("upsample_conv", &forward, "the CUDA forward, emulated on the CPU");
  m.def("upsample_conv_backward", &backward, "the CUDA backward, emulated on the CPU");
  m.def("bn_lrelu", &bn_lrelu, "the CUDA bn_lrelu, emulated on the CPU");
  m.def("bn_lrelu_backward", &bn_lrelu_backward, "the CUDA bn_lrelu backward, emulated on the CPU");
}
