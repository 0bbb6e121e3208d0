"""madfast.ops.kl_div: validation, backend choice, torch.library registration and autograd.

The compiled ops compute per-row losses and, in the same pass, the gradient of each row's loss
(``madfast::kl_div_fwd`` in csrc/, ``madfast::kl_div_fwd_triton`` here); autograd's backward
only scales those gradients by grad_output. The reduction is a torch op on the (B,) rows.
"""

from __future__ import annotations

import importlib.util

import torch

from madfast import _backend
from madfast.ops._dtypes import acc_dtype
from madfast.ops._checks import check_choice, check_floating, check_positive, check_same
from madfast.ops.kl.reference import REDUCTIONS, torch_kl_div

__all__ = ["kl_div", "kl_rows", "l1_rows", "check_kl_args", "reduce_rows"]


def check_kl_args(op: str, student_logits, teacher_logits, temperature) -> None:
    check_floating(op, "student_logits", student_logits, ndim=2)
    check_floating(op, "teacher_logits", teacher_logits, ndim=2)
    check_same(op, "teacher_logits", teacher_logits, "student_logits", student_logits)
    check_positive(op, "temperature", temperature)


def _fake_kl_div_fwd(s, t, temperature, grad_student, grad_teacher):
    return (s.new_empty(s.shape[0], dtype=acc_dtype(s.dtype)), s.new_empty(s.shape if grad_student else (0,)),
            s.new_empty(s.shape if grad_teacher else (0,)))


def _fake_l1_fwd(s, t, grad_student):
    return s.new_empty(s.shape[0], dtype=acc_dtype(s.dtype)), s.new_empty(s.shape if grad_student else (0,))


def _saved_grad(grad: torch.Tensor, g_rows: torch.Tensor, name: str) -> torch.Tensor:
    if grad.numel() == 0 and g_rows.numel() != 0:
        raise RuntimeError(f"the forward was called with {name}=False, so it kept no gradient")
    return (grad * g_rows.unsqueeze(1)).to(grad.dtype)


def _kl_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])


def _kl_backward(ctx, g_rows, _g_gs, _g_gt):
    gs, gt = ctx.saved_tensors
    return (_saved_grad(gs, g_rows, "grad_student") if ctx.needs_input_grad[0] else None,
            _saved_grad(gt, g_rows, "grad_teacher") if ctx.needs_input_grad[1] else None, None, None, None)


def _l1_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _l1_backward(ctx, g_rows, _g_gs):
    (gs,) = ctx.saved_tensors
    g = _saved_grad(gs, g_rows, "grad_student") if any(ctx.needs_input_grad[:2]) else None
    return (g if ctx.needs_input_grad[0] else None, -g if ctx.needs_input_grad[1] else None, None)


def _register(name: str, fake, setup, backward) -> None:
    if _backend.has_kernel(name, "CPU") or _backend.has_kernel(name, "CUDA"):
        torch.library.register_fake(f"madfast::{name}")(fake)
        torch.library.register_autograd(f"madfast::{name}", backward, setup_context=setup)


_register("kl_div_fwd", _fake_kl_div_fwd, _kl_setup, _kl_backward)
_register("l1_fwd", _fake_l1_fwd, _l1_setup, _l1_backward)

if importlib.util.find_spec("triton") is not None:
    # Opaque custom ops rather than triton_op: the same registration then runs (and is tested)
    # under the CPU interpreter, and each is a single kernel that inductor has nothing to fuse into.
    from madfast.ops.kl.triton_kernel import triton_kl_div_fwd, triton_l1_fwd

    @torch.library.custom_op("madfast::kl_div_fwd_triton", mutates_args=())
    def _kl_div_fwd_triton(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                           grad_student: bool, grad_teacher: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return triton_kl_div_fwd(student_logits, teacher_logits, temperature, grad_student, grad_teacher)

    @torch.library.custom_op("madfast::l1_fwd_triton", mutates_args=())
    def _l1_fwd_triton(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       grad_student: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return triton_l1_fwd(student_logits, teacher_logits, grad_student)

    _kl_div_fwd_triton.register_fake(_fake_kl_div_fwd)
    _kl_div_fwd_triton.register_autograd(_kl_backward, setup_context=_kl_setup)
    _l1_fwd_triton.register_fake(_fake_l1_fwd)
    _l1_fwd_triton.register_autograd(_l1_backward, setup_context=_l1_setup)


def _wants_grad(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def kl_rows(s: torch.Tensor, t: torch.Tensor, temperature: float, backend: str) -> torch.Tensor:
    """(B,) per-row τ²·KL on a compiled backend, in fp32 (fp64 for fp64), differentiable."""
    op = _backend.compiled_op("kl_div_fwd", backend)
    return op(s, t, float(temperature), _wants_grad(s), _wants_grad(t))[0]


def l1_rows(s: torch.Tensor, t: torch.Tensor, backend: str) -> torch.Tensor:
    """(B,) per-row Σ|s − t| on a compiled backend, differentiable."""
    op = _backend.compiled_op("l1_fwd", backend)
    return op(s, t, _wants_grad(s) or _wants_grad(t))[0]


def reduce_rows(rows: torch.Tensor, reduction: str, numel: int) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / (rows.numel() if reduction == "batchmean" else numel)


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
        A 0-d tensor, or (B,) for "none", in the logits' dtype (accumulated in fp32).
    """
    check_kl_args("kl_div", student_logits, teacher_logits, temperature)
    check_choice("kl_div", "reduction", reduction, REDUCTIONS)
    chosen = _backend.choose("kl_div_fwd", backend, student_logits.device)
    if chosen == "torch":
        return torch_kl_div(student_logits, teacher_logits, temperature, reduction)
    rows = kl_rows(student_logits, teacher_logits, temperature, chosen)
    return reduce_rows(rows, reduction, student_logits.numel()).to(student_logits.dtype)
