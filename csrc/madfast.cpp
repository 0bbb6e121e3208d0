// Schemas of every madfast op, written once. Each backend registers its own impl
// (TORCH_LIBRARY_IMPL in csrc/<op>.cpp for CPU, csrc/cuda/<op>.cu for CUDA).
#include <torch/library.h>

#ifdef MADFAST_PYTHON_MODULE
#include <Python.h>

// `import madfast._C` only needs to load this library so that the static
// registrations below run; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(madfast, m) {
  // ema <- ema + (1 - decay) * (tensor - ema), in place, in fp32 (fp64 for fp64);
  // non-floating pairs are copied. decay: 0-d floating tensor.
  m.def("ema_update_(Tensor(a!)[] ema_tensors, Tensor[] tensors, Tensor decay) -> ()");
}
