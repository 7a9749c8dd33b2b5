"""Evaluation of ternary (and any) causal LMs: perplexity with strided windows (``bittern eval``)."""

from __future__ import annotations

from bittern.eval.perplexity import (
    PerplexityResult,
    default_window,
    describe_variant,
    evaluate_file,
    load_tokenizer,
    read_text,
    sliding_window_nll,
    tokenize,
)

__all__ = [
    "PerplexityResult",
    "default_window",
    "describe_variant",
    "evaluate_file",
    "load_tokenizer",
    "read_text",
    "sliding_window_nll",
    "tokenize",
]
