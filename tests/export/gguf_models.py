"""Helpers shared by the GGUF export tests (imported by them; fixtures live in the test files): small tokenizers,
ternary checkpoints written in bittern's layouts, and a brief ternary training loop."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def documents(start: int = 0, stop: int = 30) -> list[str]:
    """``help()`` topics ``[start, stop)`` (Python's own docs; always installed)."""
    from bittern.train.corpus import pydoc_topics

    return pydoc_topics()[start:stop]


def make_bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style, bittern's own trainer) with a chat template."""
    from bittern.train.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(documents(), 384)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_spm_tokenizer():
    """A SentencePiece-style BPE tokenizer (Llama 2 layout: ``▁`` for spaces, ``<0xXX>`` byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces], show_progress=False
    )
    tokenizer.train_from_iterator(documents(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True
    )


def model_config(arch: str, vocab_size: int, hidden: int = 256, intermediate: int = 512, **overrides):
    """A 2-layer config of ``arch`` (``llama`` or ``bitnet``; bitnet defaults to relu²), tied embeddings."""
    from transformers import BitNetConfig, LlamaConfig, Qwen2Config

    values = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    values.update(overrides)
    if arch == "bitnet":
        return BitNetConfig(**{"hidden_act": "relu2", **values})
    if arch == "qwen2":
        return Qwen2Config(**values)
    return LlamaConfig(**values)


def write_model(directory: Path, config, tokenizer=None, seed: int = 0, variant: str = "packed") -> Path:
    """A random ternary model of ``config`` saved as ``variant`` (with ``tokenizer``'s files) in ``directory``."""
    from transformers import AutoModelForCausalLM

    import bittern

    if tokenizer is not None:
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    bittern.to_ternary(model)
    bittern.save_model(model, directory, variant)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def train_briefly(
    config, tokenizer, texts: list[str], steps: int = 25, seq_len: int = 32, batch: int = 8, seed: int = 0
):
    """A model of ``config`` trained with ternary weights (BitLinear, int8 activations) for ``steps`` AdamW steps
    on random windows of ``texts``: enough for peaked, text-like predictions. Returned packed (TernaryLinear)."""
    from transformers import AutoModelForCausalLM

    import bittern

    ids = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    bittern.to_bitlinear(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=generator)
        inputs = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        model(input_ids=inputs, labels=inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    bittern.to_ternary(model)
    return model.eval()
