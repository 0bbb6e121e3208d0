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

  // Logit losses, reduced on the device: loss = sign * min(D, bound) (no bound: sign * D), D = factor * sum_i row_i
  // with factor 1 ("sum"), 1/B ("batchmean"), 1/(B C) ("mean"); "none" gives the (B,) rows (sign 1, no bound).
  // loss in the logits' dtype; total = D in fp32 (fp64 for fp64), (0,) for "none". The backward recomputes both
  // gradients (empty where not asked) from the saved statistics and grad_loss, in the logits' dtype.
  // KL: row_i = T^2 KL(softmax(t_i/T) || softmax(s_i/T)); row_stats (5, B): max and log-sum-exp offset of s/T
  // and of t/T, and KL_i (csrc/logit_losses.h).
  m.def("kl_div_fwd(Tensor student_logits, Tensor teacher_logits, float temperature, str reduction, float sign, "
        "float? bound) -> (Tensor loss, Tensor row_stats, Tensor total)");
  m.def("kl_div_bwd(Tensor grad_loss, Tensor student_logits, Tensor teacher_logits, Tensor row_stats, Tensor total, "
        "float temperature, str reduction, float sign, float? bound, bool grad_student, bool grad_teacher) -> "
        "(Tensor, Tensor)");
  // L1: row_i = sum_j |s_ij - t_ij|.
  m.def("l1_fwd(Tensor student_logits, Tensor teacher_logits, str reduction, float sign, float? bound) -> "
        "(Tensor loss, Tensor total)");
  m.def("l1_bwd(Tensor grad_loss, Tensor student_logits, Tensor teacher_logits, Tensor total, str reduction, "
        "float sign, float? bound, bool grad_student, bool grad_teacher) -> (Tensor, Tensor)");

  // Per-channel mean and biased variance of x (N, C, H, W) over (N, H, W), fp32 (fp64 for fp64),
  // and the gradient of x given gradients of those two (C,) vectors.
  m.def("channel_moments(Tensor x) -> (Tensor, Tensor)");
  m.def("channel_moments_backward(Tensor grad_mean, Tensor grad_var, Tensor x, Tensor mean) -> Tensor");
  // DeepInversion's BN loss over many layers in one call: loss = sum_l ||mean_l - running_mean_l||_2 +
  // ||var_l - running_var_l||_2 (0-d), moments (2, sum_l C_l) the means and biased variances, norms (2, L)
  // the two norms per layer; all fp32 (fp64 when an x is fp64). The backward gives every layer's grad_x.
  m.def("bn_stat_losses(Tensor[] x, Tensor[] running_mean, Tensor[] running_var) -> (Tensor loss, Tensor moments, "
        "Tensor norms)");
  m.def("bn_stat_losses_backward(Tensor grad_loss, Tensor[] x, Tensor[] running_mean, Tensor[] running_var, "
        "Tensor moments, Tensor norms) -> Tensor[]");

  // The block's tail, BatchNorm folded into per-channel scale and shift: LeakyReLU(y * scale_c + shift_c)
  // in y's dtype and layout; scale, shift (C,) any floating dtype, used in fp32 (fp64 for fp64).
  m.def("bn_lrelu(Tensor y, Tensor scale, Tensor shift, float negative_slope) -> Tensor");
  // Its backward in one pass: (grad_y, grad_scale = Sum gz y, grad_shift = Sum gz), gz = grad LeakyReLU'(z);
  // the (C,) gradients in fp32 (fp64 for fp64).
  m.def("bn_lrelu_backward(Tensor grad, Tensor y, Tensor scale, Tensor shift, float negative_slope) -> "
        "(Tensor, Tensor, Tensor)");
}
