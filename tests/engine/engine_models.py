"""Tiny trained ternary models, a tokenizer and saved checkpoints for the engine tests (built once per process).

Random-init models predict near-ties, so argmax agreement would only measure noise. These models are trained for
:data:`TRAIN_STEPS` steps (BitLinear, quantization-aware) on a learnable synthetic language — next token
``(7 * token + 3) mod V``, 10% of tokens random — until their predictions are confident, then packed to
TernaryLinear. The BitNet model ties its head to the embeddings (as 2B4T does); the Llama model does not.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from conftest import one_thread, tiny_model

import bittern

VOCAB = 384
TRAIN_STEPS = 80
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from bittern.train.corpus import pydoc_topics
    from bittern.train.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(pydoc_topics()[:30], VOCAB)
    assert len(tokenizer) == VOCAB
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tokenizer():
    """A byte-level BPE tokenizer of :data:`VOCAB` entries (``<|endoftext|>`` = BOS/EOS/pad) with a chat template."""
    return copy.deepcopy(_tokenizer())


def synthetic_tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    """int64 ``[batch, length]`` sequences of the synthetic language."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.empty(batch, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (batch,), generator=generator)
    for t in range(1, length):
        noise = torch.rand(batch, generator=generator) < 0.1
        random = torch.randint(0, VOCAB, (batch,), generator=generator)
        x[:, t] = torch.where(noise, random, (7 * x[:, t - 1] + 3) % VOCAB)
    return x


@functools.cache
def _trained(arch: str) -> torch.nn.Module:
    tok = _tokenizer()
    ids = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id}
    model = tiny_model(arch, head_gain=1.0, vocab_size=VOCAB, tie_word_embeddings=arch == "bitnet", **ids)
    bittern.to_bitlinear(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    with one_thread():
        for step in range(TRAIN_STEPS):
            batch = synthetic_tokens(8, 65, seed=1000 + step)
            logits = model(batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    loss = float(loss.detach())
    assert loss < 2.0, f"the {arch} test model did not learn the synthetic language (loss {loss:.2f})"
    return bittern.to_ternary(model.eval())


def trained_model(arch: str) -> torch.nn.Module:
    """A fresh copy of the trained tiny ``arch`` model (``llama`` or ``bitnet``), TernaryLinear layers, float32."""
    return copy.deepcopy(_trained(arch))


def save_variants(arch: str, root: Path) -> dict[str, Path]:
    """The trained model saved under ``root`` as ``packed`` (divide), ``packed-multiply``, ``bf16`` (float32
    dense tensors, so it reproduces the packed numbers exactly), ``bf16-bfloat16`` (the variant as usually
    written, bfloat16 tensors) and ``prequantized``, each with the tokenizer."""
    tok_dir = root / "tokenizer"
    tokenizer().save_pretrained(tok_dir)
    model = trained_model(arch)
    return {
        "packed": bittern.save_model(model, root / "packed", "packed", tokenizer_source=tok_dir),
        "packed-multiply": bittern.save_model(
            model, root / "packed-multiply", "packed", scale_convention="multiply", tokenizer_source=tok_dir
        ),
        "bf16": bittern.save_model(model, root / "bf16", "bf16", dtype=torch.float32, tokenizer_source=tok_dir),
        "bf16-bfloat16": bittern.save_model(model, root / "bf16-bfloat16", "bf16", tokenizer_source=tok_dir),
        "prequantized": bittern.save_model(model, root / "prequantized", "prequantized", tokenizer_source=tok_dir),
    }
