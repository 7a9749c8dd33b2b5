"""Shared fixtures: tiny random Hugging Face causal LMs of every architecture bittern is tested on."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter (slow: small shapes). It is read when Triton is
# imported, which bittern does lazily: setting it here, before any kernel runs, is early enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests check what the kernels compute, not which tile shape is fastest: skip autotuning every test shape.
os.environ.setdefault("BITTERN_AUTOTUNE", "0")

# Keep CPU test runs deterministic and quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "bitnet")

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.02,
)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread: the tests' shapes are tiny, and two threads on a shared 2-core machine spend
    their time waiting for each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """:func:`one_thread` for a whole test module: ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    with one_thread():
        yield


def tiny_config(arch: str, **overrides):
    """A small config of ``arch`` (hidden 64, 2 layers, vocab 256); ``overrides`` replace any field."""
    from transformers import BitNetConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    values = {**_COMMON, **overrides}
    if arch == "llama":
        return LlamaConfig(**values)
    if arch == "mistral":
        return MistralConfig(**values)
    if arch == "qwen2":  # q/k/v projections carry biases
        return Qwen2Config(**values)
    if arch == "qwen3":  # q_norm / k_norm inside attention
        return Qwen3Config(**{"head_dim": 16, **values})
    if arch == "bitnet":  # attn_sub_norm / ffn_sub_norm, relu² MLP, no biases
        return BitNetConfig(**{"hidden_act": "relu2", **values})
    raise ValueError(f"unknown test architecture {arch!r}")


def tiny_model(arch: str, seed: int = 0, head_gain: float = 8.0, **overrides):
    """A tiny random ``arch`` model in eval mode, float32.

    ``head_gain`` scales the LM head so that logits have clear winners (random models otherwise produce
    near-ties, and argmax-agreement checks would only measure noise).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32).eval()
    with torch.no_grad():
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            head.weight.mul_(head_gain)
    return model


def token_batch(vocab_size: int = 256, batch: int = 4, length: int = 64, seed: int = 1) -> torch.Tensor:
    """int64 ``[batch, length]`` random token ids."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory: pytest.TempPathFactory):
    """24 ``help()`` topics as ``00.txt`` … ``23.txt``: enough documents for the training tests' 1-in-20 hold-out."""
    from bittern.train.corpus import pydoc_topics

    directory = tmp_path_factory.mktemp("text")
    for index, topic in enumerate(pydoc_topics()[:24]):
        (directory / f"{index:02d}.txt").write_text(topic, encoding="utf-8")
    return directory


def tiny_train_args(out, data, *, batch_size: int, steps: int, save_every: int, eval_every: int = 100) -> list[str]:
    """``bittern train`` arguments for a seconds-long CPU run: 2-layer tiny preset, 320-token BPE, 32 tokens,
    every step logged, no export, no progress bar."""
    options = {
        "--out": out,
        "--preset": "tiny",
        "--num-layers": 2,
        "--data": data,
        "--vocab-size": 320,
        "--seq-len": 32,
        "--batch-size": batch_size,
        "--steps": steps,
        "--save-every": save_every,
        "--eval-every": eval_every,
        "--log-every": 1,
        "--lr": 3e-3,
    }
    return ["train", *(str(item) for pair in options.items() for item in pair), "--no-export", "--quiet"]
