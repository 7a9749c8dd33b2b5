"""The generation engine (gpt-fast style): a compact decoder forward over the model's own modules, a static KV
cache, the decode step captured in a CUDA graph, sampling through transformers' logits processors.

:func:`load` (also ``bittern.load``) builds an :class:`Engine` from a checkpoint directory; ``bittern generate``
and ``bittern chat`` are its command line.
"""

from __future__ import annotations

from bittern.engine.decoder import SUPPORTED_MODEL_TYPES, Decoder, StaticKVCache
from bittern.engine.engine import Engine, GenerationResult, load, weight_bytes
from bittern.engine.sampling import SamplingParams

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Decoder",
    "Engine",
    "GenerationResult",
    "SamplingParams",
    "StaticKVCache",
    "load",
    "weight_bytes",
]
