"""madfast.ops.kl_div: validation, backend choice, torch.library registration and autograd of the
logit losses (KL and L1; madfast.ops.adversarial_loss uses the same ops with sign −1 and a bound).

Forward ``madfast::kl_div_fwd`` / ``l1_fwd`` (csrc/, or ``*_triton`` here): one read of the logits,
per-row statistics and the reduced, bounded loss written on the device. Backward ``kl_div_bwd`` /
``l1_bwd``: both gradients recomputed from those statistics and the device-side grad_output. So a
forward+backward is two dispatched ops and no (B, C) tensor besides the returned gradients.
"""

from __future__ import annotations

import importlib.util

import torch

from madfast import _backend
from madfast.ops._checks import check_choice, check_devices, check_floating, check_positive, check_same
from madfast.ops._dtypes import acc_dtype
from madfast.ops._register import register
from madfast.ops.kl.reference import N_STATS, REDUCTIONS, loss_outputs, torch_kl_div

__all__ = ["kl_div", "kl_loss", "l1_loss", "check_kl_args"]


def check_kl_args(op: str, student_logits, teacher_logits, temperature) -> None:
    check_floating(op, "student_logits", student_logits, ndim=2)
    check_floating(op, "teacher_logits", teacher_logits, ndim=2)
    check_same(op, "teacher_logits", teacher_logits, "student_logits", student_logits)
    check_positive(op, "temperature", temperature)


def _fake_kl_fwd(s, t, temperature, reduction, sign, bound):
    # checked here too: a meta tensor beside a real one sends the dispatcher to this fake
    check_kl_args("kl_div_fwd", s, t, temperature)
    loss, total = loss_outputs(s, reduction)
    return loss, s.new_empty((N_STATS, s.shape[0]), dtype=acc_dtype(s.dtype)), total


def _fake_l1_fwd(s, t, reduction, sign, bound):
    check_kl_args("l1_fwd", s, t, 1.0)
    return loss_outputs(s, reduction)


def _fake_grads(s, grad_s, grad_t):
    return s.new_empty(s.shape if grad_s else (0,)), s.new_empty(s.shape if grad_t else (0,))


def _fake_kl_bwd(grad, s, t, stats, total, temperature, reduction, sign, bound, grad_s, grad_t):
    check_kl_args("kl_div_bwd", s, t, temperature)
    check_devices("kl_div_bwd", "student_logits", s, grad_output=grad, stats=stats, total=total)
    return _fake_grads(s, grad_s, grad_t)


def _fake_l1_bwd(grad, s, t, total, reduction, sign, bound, grad_s, grad_t):
    check_kl_args("l1_bwd", s, t, 1.0)
    check_devices("l1_bwd", "student_logits", s, grad_output=grad, total=total)
    return _fake_grads(s, grad_s, grad_t)


def _setup(n_saved_outputs: int):
    """Saves the logits, the forward's statistics/total and the scalar arguments; only the loss
    has a gradient."""
    def setup(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zeros for the statistics' (absent) gradients
        ctx.save_for_backward(inputs[0], inputs[1], *output[1:1 + n_saved_outputs])
        ctx.scalars = inputs[2:]
    return setup


def _backward(backward_op, ctx, grad_loss, *_):
    want_s, want_t = ctx.needs_input_grad[:2]
    if grad_loss is None:  # the loss took no part in what was differentiated
        return (None,) * (2 + len(ctx.scalars))
    gs, gt = backward_op(grad_loss, *ctx.saved_tensors, *ctx.scalars, want_s, want_t)
    return (gs if want_s else None, gt if want_t else None) + (None,) * len(ctx.scalars)


if importlib.util.find_spec("triton") is not None:
    # Opaque custom ops rather than triton_op: the same registration then runs (and is tested)
    # under the CPU interpreter; inductor has nothing to fuse into a row reduction's two stages.
    from madfast.ops.kl import triton_kernel as _tk

    @torch.library.custom_op("madfast::kl_div_fwd_triton", mutates_args=())
    def _kl_div_fwd_triton(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                           reduction: str, sign: float, bound: float | None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tk.triton_kl_div_fwd(student_logits, teacher_logits, temperature, reduction, sign, bound)

    @torch.library.custom_op("madfast::kl_div_bwd_triton", mutates_args=())
    def _kl_div_bwd_triton(grad_loss: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           row_stats: torch.Tensor, total: torch.Tensor, temperature: float, reduction: str,
                           sign: float, bound: float | None, grad_student: bool, grad_teacher: bool
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        return _tk.triton_kl_div_bwd(grad_loss, student_logits, teacher_logits, row_stats, total, temperature,
                                     reduction, sign, bound, grad_student, grad_teacher)

    @torch.library.custom_op("madfast::l1_fwd_triton", mutates_args=())
    def _l1_fwd_triton(student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str, sign: float,
                       bound: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        return _tk.triton_l1_fwd(student_logits, teacher_logits, reduction, sign, bound)

    @torch.library.custom_op("madfast::l1_bwd_triton", mutates_args=())
    def _l1_bwd_triton(grad_loss: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       total: torch.Tensor, reduction: str, sign: float, bound: float | None, grad_student: bool,
                       grad_teacher: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _tk.triton_l1_bwd(grad_loss, student_logits, teacher_logits, total, reduction, sign, bound,
                                 grad_student, grad_teacher)


# the row statistics and total (KL) / the total (L1) are saved for the backward
register("kl_div_fwd", fake=_fake_kl_fwd, backward_fake=_fake_kl_bwd, setup_context=_setup(2), backward=_backward)
register("l1_fwd", fake=_fake_l1_fwd, backward_fake=_fake_l1_bwd, setup_context=_setup(1), backward=_backward)


def kl_loss(s: torch.Tensor, t: torch.Tensor, temperature: float, reduction: str, sign: float, bound: float | None,
            backend: str) -> torch.Tensor:
    """sign·min(reduced τ²·KL, bound) (the rows for "none") on a compiled backend, differentiable."""
    op = _backend.compiled_op("kl_div_fwd", backend)
    return op(s, t, float(temperature), reduction, float(sign), None if bound is None else float(bound))[0]


def l1_loss(s: torch.Tensor, t: torch.Tensor, reduction: str, sign: float, bound: float | None,
            backend: str) -> torch.Tensor:
    """sign·min(reduced Σ|s − t|, bound) (the rows for "none") on a compiled backend, differentiable."""
    op = _backend.compiled_op("l1_fwd", backend)
    return op(s, t, reduction, float(sign), None if bound is None else float(bound))[0]


def kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
           reduction: str = "batchmean", *, backend: str = "auto") -> torch.Tensor:
    """KL(softmax(t/τ) ‖ softmax(s/τ))·τ², gradients to both inputs.

    Same as ``F.kl_div(F.log_softmax(s/τ, 1), F.log_softmax(t/τ, 1), reduction, log_target=True)·τ²``
    except that ``reduction="none"`` gives one value per row.

    Args:
        student_logits: (B, C) logits of the student.
        teacher_logits: (B, C) logits of the teacher, same dtype and device.
        temperature: τ > 0.
        reduction: "batchmean" (sum / B), "sum", "mean" (sum / (B·C)) or "none" ((B,) per row).
        backend: "auto", "torch", "triton", "cuda" or "cpp" (see madfast._backend).
    Returns:
        A 0-d tensor, or (B,) for "none", in the logits' dtype (accumulated in fp32, fp64 for fp64).
    """
    check_kl_args("kl_div", student_logits, teacher_logits, temperature)
    check_choice("kl_div", "reduction", reduction, REDUCTIONS)
    chosen = _backend.choose("kl_div_fwd", backend, student_logits.device)
    if chosen == "torch":
        return torch_kl_div(student_logits, teacher_logits, temperature, reduction)
    return kl_loss(student_logits, teacher_logits, temperature, reduction, 1.0, None, chosen)
