"""The reference for the numbers around the ternary math that kernels and use-cases compute: the residual-add +
RMSNorm (+ activation quantization) the fused norm kernel replaces, and the distillation KL that training and
healing minimise or report. Plain PyTorch, like :mod:`bittern.quant` (the ternary math itself); every kernel and
every caller of these numbers goes through or is tested against this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bittern import quant


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    quantize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Residual add, a Hugging Face ``LlamaRMSNorm``'s forward, and optionally the per-token int8 quantization of
    its output: ``(s, y, (yq, s_x) or None)`` with ``s = x + residual`` (``x`` itself if None),
    ``y = weight * (s_f32 * rsqrt(mean(s_f32²) + eps)).to(s.dtype)`` (the module's own formula, in its order) and
    ``(yq, s_x) = quant.quantize_activations(y)``. ``x`` ``[..., D]``; ``y`` in ``promote_types(weight.dtype,
    s.dtype)``."""
    summed = x if residual is None else x + residual
    s32 = summed.to(torch.float32)
    y = weight * (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)).to(summed.dtype)
    return summed, y, quant.quantize_activations(y) if quantize else None


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` averaged over positions, in float32 (nats).

    Args:
        student_logits, teacher_logits: ``[..., V]`` of any float dtype (the same shape).
        temperature: ``T`` > 0.
        mask: bool ``[...]`` selecting the positions that count (None: all of them).

    Returns:
        a float32 scalar; 0 (with the student's graph) when the mask selects no position.
    """
    width = student_logits.shape[-1]
    student, teacher = student_logits, teacher_logits
    if mask is not None:
        student, teacher = student[mask], teacher[mask]
    student = student.float().reshape(-1, width) / temperature
    teacher = teacher.float().reshape(-1, width) / temperature
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0
    # kl_div(input, target) = Σ exp(target)·(target − input); batchmean divides by the positions
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2
