"""The chunked causal-LM loss (bittern.train.losses): the value and every gradient equal transformers' own loss
(full training, BitLinear and packed + LoRA models, a PEFT-wrapped head, tied embeddings, gradient checkpointing,
ignored labels, chunk sizes that do not divide the token count), the logits are not kept for the backward, and bad
arguments are refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model, token_batch
from torch import nn

import bittern
from bittern.train.losses import causal_lm_loss, chunked_causal_lm_loss, final_hidden_states, output_head

pytestmark = pytest.mark.usefixtures("single_thread")

BATCH, LENGTH = 2, 17  # 34 positions: chunks of 5 and 7 leave a remainder
CHUNKS = (1, 5, 7, 34, 1000)


def _labels(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` with some targets ignored (-100): a prompt-like prefix of row 0 and scattered positions of row 1."""
    labels = ids.clone()
    labels[0, :6] = -100
    labels[1, 3::4] = -100
    return labels


def _gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gradient of every trainable parameter (which must have one), then cleared."""
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            grads[name] = param.grad.clone()
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_loss_and_gradients(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, chunk: int) -> None:
    reference = model(input_ids=ids, labels=labels).loss
    reference.backward()
    expected = _gradients(model)
    loss = causal_lm_loss(model, ids, labels, chunk)
    loss.backward()
    got = _gradients(model)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)
    assert got.keys() == expected.keys() and expected
    for name in expected:
        assert expected[name].abs().max() > 0, name  # a zero gradient would compare equal whatever the loss did
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


# -- equal to transformers' loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("arch", ["llama", "bitnet"])
def test_full_training_loss_and_gradients_equal_transformers(arch: str, chunk: int) -> None:
    model = tiny_model(arch).train()
    ids = token_batch(batch=BATCH, length=LENGTH)
    _assert_same_loss_and_gradients(model, ids, _labels(ids), chunk)


@pytest.mark.parametrize("chunk", [5, 1000])
def test_bitlinear_latent_training_equals_transformers(chunk: int) -> None:
    model = bittern.to_bitlinear(tiny_model("bitnet")).train()
    ids = token_batch(batch=BATCH, length=LENGTH)
    _assert_same_loss_and_gradients(model, ids, _labels(ids), chunk)


def _randomize_lora_b(model: nn.Module) -> None:
    """Non-zero ``lora_B`` (fresh adapters start at zero, which leaves ``lora_A`` without a gradient)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("chunk", [5, 1000])
def test_lora_on_a_packed_base_with_a_frozen_head_equals_transformers(chunk: int) -> None:
    from bittern.peft import apply_lora

    model = apply_lora(bittern.to_ternary(tiny_model("llama")), rank=4).train()
    _randomize_lora_b(model)
    assert not output_head(model).weight.requires_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n
    }
    ids = token_batch(batch=BATCH, length=LENGTH)
    _assert_same_loss_and_gradients(model, ids, _labels(ids), chunk)


def test_a_peft_wrapped_head_trains_through_the_chunks() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    _randomize_lora_b(model.train())
    assert any("lm_head.lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
    ids = token_batch(batch=BATCH, length=LENGTH)
    _assert_same_loss_and_gradients(model, ids, _labels(ids), 5)


def test_tied_embeddings_get_both_gradients() -> None:
    model = tiny_model("llama", tie_word_embeddings=True).train()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = token_batch(batch=BATCH, length=LENGTH)
    _assert_same_loss_and_gradients(model, ids, _labels(ids), 7)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("frozen", [False, True])
def test_gradient_checkpointed_model_equals_transformers(frozen: bool) -> None:
    """As benchmarks/lora.py's -ckpt arms run: checkpointed blocks, and (frozen) only some weights trained."""
    model = tiny_model("bitnet", tie_word_embeddings=True).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if frozen:
        model.requires_grad_(False)
        model.model.layers[1].mlp.requires_grad_(True)
        model.enable_input_require_grads()
    ids = token_batch(batch=BATCH, length=LENGTH)
    _assert_same_loss_and_gradients(model, ids, _labels(ids), 5)


def test_bf16_logits_are_upcast_to_float32_before_the_cross_entropy() -> None:
    """A bf16 model: transformers upcasts its logits; a bf16 cross-entropy would be off by ~1e-4 relative."""
    model = tiny_model("bitnet", tie_word_embeddings=True).to(torch.bfloat16).train()
    ids = token_batch(batch=BATCH, length=LENGTH)
    reference = model(input_ids=ids, labels=ids).loss
    loss = causal_lm_loss(model, ids, ids, 5)
    assert loss.dtype == reference.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)


def test_num_items_in_batch_divides_the_sum_as_transformers_does() -> None:
    model = tiny_model("llama").train()
    ids = token_batch(batch=BATCH, length=LENGTH)
    labels = _labels(ids)
    reference = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    loss = causal_lm_loss(model, ids, labels, 5, num_items_in_batch=torch.tensor(100))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)
    mean = causal_lm_loss(model, ids, labels, 5)
    counted = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, mean * counted / 100, rtol=1e-5, atol=0)


@pytest.mark.parametrize("chunk", [0, None])
def test_no_chunk_is_transformers_own_loss(chunk: int | None) -> None:
    model = tiny_model("llama")
    ids = token_batch(batch=BATCH, length=LENGTH)
    labels = _labels(ids)
    assert torch.equal(causal_lm_loss(model, ids, labels, chunk), model(input_ids=ids, labels=labels).loss)


def test_an_attention_mask_reaches_the_forward() -> None:
    model = tiny_model("llama")
    ids = token_batch(batch=BATCH, length=LENGTH)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding of row 1
    labels = _labels(ids)
    reference = model(input_ids=ids, labels=labels, attention_mask=mask).loss
    torch.testing.assert_close(causal_lm_loss(model, ids, labels, 5, attention_mask=mask), reference, rtol=1e-5, atol=0)
    assert not torch.allclose(causal_lm_loss(model, ids, labels, 5), reference)


def test_final_hidden_states_are_what_the_head_projects() -> None:
    model = tiny_model("bitnet")
    ids = token_batch(batch=BATCH, length=LENGTH)
    hidden, outputs = final_hidden_states(model, input_ids=ids)
    assert hidden.shape == (BATCH, LENGTH, 64)
    assert outputs.logits.shape == (BATCH, 1, 256)  # only the last position went through the head
    torch.testing.assert_close(model.lm_head(hidden), model(input_ids=ids).logits)


# -- the function itself -----------------------------------------------------------------------------------------


def _head_and_hidden(vocab: int = 50, width: int = 8, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Linear(width, vocab, bias=True), torch.randn(BATCH, LENGTH, width, requires_grad=True)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_ignore_index_other_than_minus_100_is_respected(chunk: int) -> None:
    head, hidden = _head_and_hidden()
    labels = torch.randint(0, 50, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    labels[:, ::3] = 7  # ignored below
    loss = chunked_causal_lm_loss(hidden, head, labels, chunk, ignore_index=7)
    targets = labels[:, 1:].reshape(-1)
    logits = head(hidden[:, :-1]).reshape(-1, 50)
    keep = targets != 7
    expected = F.cross_entropy(logits[keep], targets[keep])  # by hand: only the kept targets, plain mean
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


def test_every_target_ignored_gives_a_zero_loss_with_zero_gradients() -> None:
    head, hidden = _head_and_hidden()
    labels = torch.full((BATCH, LENGTH), -100)
    loss = chunked_causal_lm_loss(hidden, head, labels, 5)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(head.weight.grad) == 0


def test_only_the_last_position_without_a_target_is_skipped() -> None:
    """The shift: position t predicts labels[t + 1]; each row's last position predicts nothing."""
    head, hidden = _head_and_hidden()
    labels = torch.randint(0, 50, (BATCH, LENGTH), generator=torch.Generator().manual_seed(2))
    chunked_causal_lm_loss(hidden, head, labels, 5).backward()
    assert torch.count_nonzero(hidden.grad[:, -1]) == 0
    assert bool((hidden.grad[:, :-1].abs().sum(-1) > 0).all())


def _saved_for_backward(compute) -> int:
    """Elements of every tensor autograd saves for the backward while ``compute()`` runs (outside checkpoints)."""
    sizes: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute()
    return sum(sizes)


def test_the_logits_are_not_kept_for_the_backward() -> None:
    vocab = 1000
    head, hidden = _head_and_hidden(vocab=vocab)
    labels = torch.randint(0, vocab, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    positions = BATCH * LENGTH

    def unchunked() -> None:
        logits = head(hidden).float().reshape(-1, vocab)
        F.cross_entropy(logits, F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1))

    assert _saved_for_backward(unchunked) >= positions * vocab  # the float32 log-softmax of every position
    for chunk in (5, 1000):
        saved = _saved_for_backward(lambda chunk=chunk: chunked_causal_lm_loss(hidden, head, labels, chunk))
        assert saved < 2 * hidden.numel() + positions + 16  # the hidden rows and targets, no [tokens, vocab]


def test_no_grad_gives_the_same_value() -> None:
    head, hidden = _head_and_hidden()
    labels = torch.randint(0, 50, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        quiet = chunked_causal_lm_loss(hidden, head, labels, 5)
    assert not quiet.requires_grad
    torch.testing.assert_close(quiet, chunked_causal_lm_loss(hidden, head, labels, 5).detach())


# -- refused arguments ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hidden_shape", "labels", "chunk", "message"),
    [
        ((BATCH, LENGTH, 8), torch.zeros(BATCH, LENGTH, dtype=torch.long), 0, "chunk_tokens must be a positive"),
        ((BATCH, LENGTH, 8), torch.zeros(BATCH, LENGTH, dtype=torch.long), -4, "chunk_tokens must be a positive"),
        ((BATCH, LENGTH, 8), torch.zeros(BATCH, LENGTH, dtype=torch.long), 2.5, "chunk_tokens must be a positive"),
        ((BATCH, LENGTH, 8), torch.zeros(BATCH, LENGTH, dtype=torch.long), True, "chunk_tokens must be a positive"),
        ((BATCH * LENGTH, 8), torch.zeros(BATCH, LENGTH, dtype=torch.long), 4, r"hidden must be \[B, T, H\]"),
        ((BATCH, LENGTH, 8), torch.zeros(BATCH, LENGTH - 1, dtype=torch.long), 4, r"labels must be \[B, T\]"),
        ((BATCH, LENGTH, 8), torch.zeros(BATCH * LENGTH, dtype=torch.long), 4, r"labels must be \[B, T\]"),
        ((BATCH, LENGTH, 8), torch.zeros(BATCH, LENGTH), 4, "labels must hold integer token ids"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(hidden_shape, labels, chunk, message) -> None:
    with pytest.raises(ValueError, match=message):
        chunked_causal_lm_loss(torch.zeros(hidden_shape), nn.Linear(8, 50), labels, chunk)


def test_a_model_that_transforms_its_logits_is_refused() -> None:
    model = tiny_model("llama")
    model.config.final_logit_softcapping = 30.0
    ids = token_batch(batch=BATCH, length=LENGTH)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_loss(model, ids, ids, 5)


def test_data_parallel_is_refused() -> None:
    model = nn.DataParallel(tiny_model("llama"))
    ids = token_batch(batch=BATCH, length=LENGTH)
    with pytest.raises(ValueError, match="DataParallel"):
        causal_lm_loss(model, ids, ids, 5)
