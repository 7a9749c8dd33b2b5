"""The reference for the numbers around the ternary math that kernels and use-cases compute: the residual-add +
RMSNorm (+ activation quantization) the fused norm kernel replaces, the decode step's attention (rope, cache write,
attention of one new token) the attention kernels replace, and the distillation KL that training and healing minimise
or report. Plain PyTorch, like :mod:`bittern.quant` (the ternary math itself); every kernel and every caller of these
numbers goes through or is tested against this module.
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


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-family rope, ``x * cos + rotate_half(x) * sin`` over the last dimension, in the operands' dtype (as the
    Hugging Face models compute it): ``rotate_half`` of ``[x1, x2]`` is ``[-x2, x1]``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot: torch.Tensor,
    pad: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """One decode step's attention over a static KV cache, rope and cache write included.

    Row ``b``'s new token sits at cache slot ``t = slot`` and rope position ``max(t - pad[b], 0)`` (its row of
    ``cos`` / ``sin``). Its key, roped, and its value are written into ``keys`` / ``values`` at slot ``t`` (in
    place); its query heads, roped, attend (softmax of ``q·k * scale`` in float32) over the slots it sees: ``pad[b]
    … t``, only ``t`` itself when ``pad[b] > t`` (a padding row), and with a sliding ``window`` only those
    ``> t - window``.

    Args:
        q: ``[B, H_kv, G, D]``, the query heads grouped by their KV head.
        k, v: ``[B, H_kv, D]``, before rope.
        cos, sin: ``[P, D]`` rope tables, ``P > t``, in the model's dtype.
        keys, values: ``[B_max >= B, H_kv, S > t, D]``; rows ``>= B`` are not touched.
        slot: int64 ``[1]``; pad: int64 ``[B]``.

    Returns:
        ``[B, H_kv, G, D]`` in ``q``'s dtype.
    """
    batch = q.shape[0]
    t = int(slot.reshape(-1)[0])
    positions = (t - pad.to(device=cos.device, dtype=torch.int64)).clamp(min=0)
    c, s = cos[positions], sin[positions]  # [B, D]
    q = rotate_half_rope(q, c[:, None, None], s[:, None, None])
    keys[:batch, :, t] = rotate_half_rope(k, c[:, None], s[:, None])
    values[:batch, :, t] = v
    first = pad.to(device=q.device, dtype=torch.int64).clamp(max=t)
    if window is not None:
        first = first.clamp(min=t - window + 1)
    seen = torch.arange(t + 1, device=q.device)[None, :] >= first[:, None]  # [B, t + 1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = q.to(compute) @ keys[:batch, :, : t + 1].to(compute).transpose(-1, -2) * scale  # [B, H, G, t + 1]
    scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ values[:batch, :, : t + 1].to(compute)).to(q.dtype)


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
