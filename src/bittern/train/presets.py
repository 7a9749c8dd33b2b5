"""Named model shapes for training from scratch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bittern.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """A model shape. ``vocab_size`` None means: the tokenizer's size."""

    architecture: str  # "llama" or "bitnet"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_positions: int
    vocab_size: int | None = None
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    description: str = ""

    def config(self, vocab_size: int, num_layers: int | None = None, **token_ids: Any):
        """A transformers config of this shape (``vocab_size`` from the tokenizer unless the preset fixes it)."""
        common = dict(
            vocab_size=self.vocab_size or vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=num_layers or self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_positions,
            tie_word_embeddings=self.tie_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rms_norm_eps=1e-5,
            **token_ids,
        )
        if self.architecture == "bitnet":
            from transformers import BitNetConfig

            return BitNetConfig(hidden_act="relu2", **common)
        from transformers import LlamaConfig

        return LlamaConfig(hidden_act="silu", **common)


PRESETS: dict[str, Preset] = {
    # every width a multiple of 256, so each ternary layer's rows fit GGUF's TQ1_0 / TQ2_0 blocks
    "tiny": Preset(
        "llama", 256, 768, 4, 4, 2, 1024, description="Llama, 4 layers, hidden 256 (~3M linear weights; CPU demo)"
    ),
    "small": Preset("llama", 512, 1408, 8, 8, 4, 2048, description="Llama, 8 layers, hidden 512 (~25M linear)"),
    "125m": Preset("llama", 768, 2048, 12, 12, 4, 2048, description="Llama, 12 layers, hidden 768 (~85M linear)"),
    "2b4t-shape": Preset(
        "bitnet",
        2560,
        6912,
        30,
        20,
        5,
        4096,
        vocab_size=128256,
        rope_theta=500000.0,
        description="BitNet b1.58 2B4T dimensions: BitNet (sub-norms, relu²), 30 layers, hidden 2560, vocab 128256",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``, or a :class:`ConfigError` listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
