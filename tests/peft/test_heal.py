"""Healing a merged model: a short quantization-aware run that wins back what rounding lost."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model, token_batch

import bittern
from bittern.errors import ConfigError
from bittern.nn import BitLinear, TernaryLinear
from bittern.peft import apply_lora, distillation_kl, heal, merge_lora


def test_heal_lowers_the_merged_loss_and_returns_packed_layers() -> None:
    model = tiny_model("llama")
    bittern.to_ternary(model)
    peft_model = apply_lora(model, rank=4)
    ids = token_batch(length=32)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(15):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = merge_lora(peft_model, layers="bitlinear")
    embeddings = merged.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        merged_loss = float(bittern.to_ternary(merged)(input_ids=ids, labels=ids).loss)
    result = heal(merged, [{"input_ids": ids}], steps=8, lr=1e-3, progress=False)
    assert result.model is merged
    assert len(result.losses) == 8
    assert not any(isinstance(m, BitLinear) for m in merged.modules())
    assert sum(isinstance(m, TernaryLinear) for m in merged.modules()) == 14
    assert torch.equal(merged.get_input_embeddings().weight, embeddings)  # only the ternary layers trained
    with torch.no_grad():
        healed_loss = float(merged(input_ids=ids, labels=ids).loss)
    assert healed_loss < merged_loss, (healed_loss, merged_loss)
    assert abs(result.losses[0] - merged_loss) < 1e-4  # the first step starts from the merged model


def test_heal_refuses_bad_input() -> None:
    with pytest.raises(ConfigError, match="at least 1 step"):
        heal(tiny_model("llama"), [token_batch()], steps=0)
    with pytest.raises(ConfigError, match="no ternary layers"):
        heal(tiny_model("llama"), [token_batch()], steps=1)


# --- heal by distillation from the LoRA model ---------------------------------------------------------------------


def adapted(steps: int = 15):
    """A LoRA model trained on one batch (eval mode) and that batch, int64 ``[4, 32]``."""
    model = tiny_model("llama")
    bittern.to_ternary(model)
    peft_model = apply_lora(model, rank=4)
    ids = token_batch(length=32)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft_model.eval(), ids


def test_distillation_lowers_the_kl_to_the_lora_model_on_held_out_tokens() -> None:
    peft_model, ids = adapted()
    teacher = copy.deepcopy(peft_model)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    merged = merge_lora(peft_model, layers="bitlinear")
    held_out = [token_batch(length=32, seed=7)]  # tokens the adapter and the heal never saw
    start = copy.deepcopy(merged)
    train_kl = distillation_kl(bittern.to_ternary(copy.deepcopy(merged)), teacher, [ids])
    held_kl = distillation_kl(bittern.to_ternary(copy.deepcopy(merged)), teacher, held_out)
    assert train_kl > 0.1 and held_kl > 0.1  # the nearest merge lost a real part of the adapter

    result = heal(merged, [ids], steps=10, lr=1e-3, teacher=teacher, progress=False)
    assert len(result.losses) == len(result.ce_losses) == len(result.kl_losses) == 10
    assert result.losses == result.kl_losses  # distill_weight defaults to 1 with a teacher
    assert result.kl_losses[0] == pytest.approx(train_kl, rel=1e-4)  # the first step starts from the merge
    assert result.kl_losses[-1] < 0.5 * result.kl_losses[0], result.kl_losses  # the trained loss falls
    assert max(result.kl_losses[5:]) < min(result.kl_losses[:2])
    assert not any(isinstance(m, BitLinear) for m in merged.modules())
    healed_kl = distillation_kl(result.model, teacher, held_out)
    assert healed_kl < 0.9 * held_kl, (healed_kl, held_kl)
    # the teacher is used, not trained, and comes back in the mode it had
    assert not teacher.training
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())

    # the same heal on the cross-entropy alone ends further from the LoRA model
    plain = heal(start, [ids], steps=10, lr=1e-3, progress=False)
    assert plain.kl_losses == [] and plain.losses == plain.ce_losses
    assert healed_kl < distillation_kl(plain.model, teacher, held_out) - 0.03


def test_a_teacher_equal_to_the_start_gives_zero_initial_kl_and_the_mix_is_logged_apart() -> None:
    peft_model, ids = adapted()
    merged = merge_lora(peft_model, layers="bitlinear")
    teacher = copy.deepcopy(merged).train()  # the merged model itself, as BitLinear latents
    with torch.no_grad():
        start_ce = float(bittern.to_ternary(copy.deepcopy(merged))(input_ids=ids, labels=ids).loss)
    result = heal(merged, [ids], steps=6, lr=1e-3, teacher=teacher, distill_weight=0.5, progress=False)
    assert abs(result.kl_losses[0]) < 1e-5, result.kl_losses
    assert result.ce_losses[0] == pytest.approx(start_ce, abs=1e-4)
    for loss, ce, kl in zip(result.losses, result.ce_losses, result.kl_losses, strict=True):
        assert loss == pytest.approx(0.5 * kl + 0.5 * ce, rel=1e-5)
    # the cross-entropy half moves the model away from its starting point: the KL is measured, not assumed
    assert result.kl_losses[-1] > 0.01, result.kl_losses
    assert result.ce_losses[-1] < result.ce_losses[0]
    assert teacher.training  # its mode is restored


def test_distill_weight_zero_measures_the_kl_without_training_on_it() -> None:
    peft_model, ids = adapted()
    teacher = copy.deepcopy(peft_model)
    merged = merge_lora(peft_model, layers="bitlinear")
    twin = copy.deepcopy(merged)
    measured = heal(merged, [ids], steps=4, lr=1e-3, teacher=teacher, distill_weight=0.0, progress=False)
    plain = heal(twin, [ids], steps=4, lr=1e-3, progress=False)
    assert measured.losses == measured.ce_losses
    assert measured.ce_losses == pytest.approx(plain.ce_losses, abs=1e-5)  # the same training as without teacher
    assert len(measured.kl_losses) == 4 and measured.kl_losses[0] > 0.1


def test_distillation_refuses_bad_arguments() -> None:
    peft_model, ids = adapted(steps=1)
    teacher = copy.deepcopy(peft_model)
    batches = [ids]
    for weight in (-0.1, 1.5, float("nan"), True, "1"):
        with pytest.raises(ConfigError, match="distill_weight"):
            heal(merge_lora(copy.deepcopy(peft_model), layers="bitlinear"), batches, 1, teacher=teacher,
                 distill_weight=weight, progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="needs a teacher"):
        heal(merge_lora(copy.deepcopy(peft_model), layers="bitlinear"), batches, 1, distill_weight=0.5)
    wide = tiny_model("llama", vocab_size=300)
    bittern.to_ternary(wide)
    with pytest.raises(ConfigError, match="vocabulary"):
        heal(merge_lora(copy.deepcopy(peft_model), layers="bitlinear"), batches, 1, teacher=wide, progress=False)
    with pytest.raises(ConfigError, match="vocabulary"):
        distillation_kl(merge_lora(copy.deepcopy(peft_model)), wide, batches)
    # merge_lora consumed the PeftModel: it now wraps the merged model itself, which cannot be its own teacher
    consumed = copy.deepcopy(peft_model)
    merged = merge_lora(consumed, layers="bitlinear")
    state = {k: v.clone() for k, v in merged.state_dict().items()}
    for same in (merged, consumed):
        with pytest.raises(ConfigError, match="is \\(or contains\\) the model"):
            heal(merged, batches, 1, teacher=same, progress=False)
    with pytest.raises(ConfigError, match=r"torch\.nn\.Module"):
        heal(merged, batches, 1, teacher=lambda input_ids: None, progress=False)
    # arguments are checked before anything changes: the refused heals left the model as it was
    assert sum(isinstance(m, BitLinear) for m in merged.modules()) == 14
    assert merged.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in merged.state_dict().items())
    with pytest.raises(ConfigError, match="no batches"):
        distillation_kl(merge_lora(copy.deepcopy(peft_model)), teacher, [])


def test_the_kl_runs_from_the_teacher_to_the_student() -> None:
    """``KL(teacher ‖ student) = Σ p_t (log p_t − log p_s)`` per position, averaged over ``B·L`` positions."""
    from bittern.peft.heal import _kl

    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 5, generator=generator)
    teacher = 3 * torch.randn(2, 3, 5, generator=generator)
    p_t, log_t, log_s = teacher.softmax(-1), teacher.log_softmax(-1), student.log_softmax(-1)
    expected = (p_t * (log_t - log_s)).sum(-1).mean()
    reverse = (student.softmax(-1) * (log_s - log_t)).sum(-1).mean()
    assert abs(float(expected) - float(reverse)) > 0.1  # the two directions differ on these logits
    assert float(_kl(student.bfloat16(), teacher)) == pytest.approx(float(expected), rel=1e-2)
    assert float(_kl(student, teacher)) == pytest.approx(float(expected), rel=1e-5)
    assert float(_kl(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="same tokenizer"):
        _kl(student, teacher[..., :4])
