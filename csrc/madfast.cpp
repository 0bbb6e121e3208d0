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
  // ema <- lerp(ema, tensor, 1 - decay), in place, in fp32 (fp64 for an fp64 EMA); decay 0 copies
  // exactly; non-floating pairs are copied. decay: a 0-d floating tensor, else decay_value (1 - decay
  // formed in double). sr_seed >= 0: fp16/bf16 EMAs rounded stochastically, with random bits hashed
  // from (sr_seed, sr_step, pair index, element index). host_table/table: a plan's cached pointer
  // table (CUDA; rebuilt in place only when a tensor's storage changes).
  m.def("ema_update_(Tensor(a!)[] ema_tensors, Tensor[] tensors, Tensor? decay, float decay_value=0., "
        "int sr_seed=-1, int sr_step=0, Tensor(b!)? host_table=None, Tensor(c!)? table=None) -> ()");

  // Per-row logit losses with the gradients of each row's loss, in one pass over the row.
  // kl_div_fwd -> (loss (B,), d loss_i/d s (B, C) or empty, d loss_i/d t (B, C) or empty), where
  // loss_i = T^2 KL(softmax(t_i/T) || softmax(s_i/T)). Loss accumulated in fp32 (fp64 for fp64).
  m.def("kl_div_fwd(Tensor student_logits, Tensor teacher_logits, float temperature, bool grad_student, "
        "bool grad_teacher) -> (Tensor, Tensor, Tensor)");
  // l1_fwd -> (sum_j |s_ij - t_ij| (B,), sign(s - t) (B, C) or empty).
  m.def("l1_fwd(Tensor student_logits, Tensor teacher_logits, bool grad_student) -> (Tensor, Tensor)");

  // Per-channel mean and biased variance of x (N, C, H, W) over (N, H, W), fp32 (fp64 for fp64),
  // and the gradient of x given gradients of those two (C,) vectors.
  m.def("channel_moments(Tensor x) -> (Tensor, Tensor)");
  m.def("channel_moments_backward(Tensor grad_mean, Tensor grad_var, Tensor x, Tensor mean) -> Tensor");

  // The block's tail, BatchNorm folded into per-channel scale and shift: LeakyReLU(y * scale_c + shift_c)
  // in y's dtype and layout; scale, shift (C,) any floating dtype, used in fp32 (fp64 for fp64).
  m.def("bn_lrelu(Tensor y, Tensor scale, Tensor shift, float negative_slope) -> Tensor");
  // Its backward in one pass: (grad_y, grad_scale = Sum gz y, grad_shift = Sum gz), gz = grad LeakyReLU'(z);
  // the (C,) gradients in fp32 (fp64 for fp64).
  m.def("bn_lrelu_backward(Tensor grad, Tensor y, Tensor scale, Tensor shift, float negative_slope) -> "
        "(Tensor, Tensor, Tensor)");

  // The generator block's conv3x3(bilinear-upsample-x2(x)) (align_corners=True, stride 1, pad 1, no
  // bias), never writing the up-sampled tensor -> (y (N, Cout, 2H, 2W) in x's dtype and layout,
  // Sum y (Cout,), Sum y^2 (Cout,)), the sums fp32 (fp64 for fp64) and empty unless stats.
  m.def("upsample_conv(Tensor x, Tensor weight, bool stats) -> (Tensor, Tensor, Tensor)");
  // Its gradients (grad_x or empty, grad_weight or empty) given grad_y and, optionally, the gradients
  // of the two sums, folded in as grad_y + grad_sum + 2 y grad_sumsq while grad_y is read (y needed then).
  m.def("upsample_conv_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? y, Tensor? grad_sum, "
        "Tensor? grad_sumsq, bool grad_input, bool grad_weight) -> (Tensor, Tensor)");
}
