"""Run an exported GGUF file in llama.cpp (through ``llama-cpp-python``, the optional ``llama`` extra) the way
bittern runs the checkpoint, so the two can be compared number for number:

* :func:`perplexity`: teacher-forced perplexity over given token ids with the same strided windows as
  :func:`bittern.eval.sliding_window_nll` (every token scored once, log-softmax in float64);
* :func:`greedy`: greedy continuation of a prompt, one token at a time, by argmax of llama.cpp's logits.

Token ids are passed in (not text), so both sides see identical inputs whatever the tokenizers do.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bittern.errors import ConfigError
from bittern.eval.perplexity import PerplexityResult, _windows


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError(
            "running GGUF files needs llama-cpp-python: pip install 'bittern[llama]' "
            '(it builds llama.cpp from source; CMAKE_ARGS="-DGGML_NATIVE=OFF" gives a portable build)'
        ) from exc
    return llama_cpp


@contextlib.contextmanager
def open_model(path: str | Path, n_ctx: int, threads: int = 2, logits_all: bool = True) -> Iterator[Any]:
    """A ``llama_cpp.Llama`` for ``path`` (CPU, ``threads`` threads), closed afterwards."""
    llama_cpp = _llama_cpp()
    model = llama_cpp.Llama(
        str(path),
        n_ctx=n_ctx,
        n_batch=min(n_ctx, 512),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
    )
    try:
        yield model
    finally:
        model.close()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(
    path: str | Path, token_ids: Sequence[int], window: int, stride: int, threads: int = 2
) -> PerplexityResult:
    """llama.cpp's teacher-forced perplexity of ``token_ids`` (windows as in :func:`bittern.eval.sliding_window_nll`).

    Args:
        path: a GGUF file.
        token_ids: ``T >= 2`` ids.
        window: tokens per forward pass; ``stride``: tokens between window starts (``1 <= stride <= window``).
    """
    ids = [int(i) for i in token_ids]
    if len(ids) < 2 or not 1 <= stride <= window:
        raise ConfigError(f"need >= 2 tokens and 1 <= stride <= window (got {len(ids)}, {stride}, {window})")
    nll = 0.0
    scored = 0
    with open_model(path, n_ctx=window) as model:
        for item in _windows(len(ids), window, stride):
            model.reset()
            model.eval(ids[item.begin : item.end])
            logits = np.asarray(model.scores[: item.end - item.begin], dtype=np.float32)
            log_probs = _log_softmax(logits[item.first_scored :])
            targets = np.asarray(ids[item.begin + 1 + item.first_scored : item.end + 1])
            nll -= float(log_probs[np.arange(targets.size), targets].sum())
            scored += targets.size
    return PerplexityResult(nll_sum=nll, tokens=scored, window=window, stride=stride)


def greedy(path: str | Path, prompt_ids: Sequence[int], new_tokens: int, threads: int = 2) -> list[int]:
    """The ``new_tokens`` ids llama.cpp generates greedily (argmax) after ``prompt_ids``."""
    prompt = [int(i) for i in prompt_ids]
    out: list[int] = []
    with open_model(path, n_ctx=len(prompt) + new_tokens + 1, threads=threads, logits_all=False) as model:
        model.reset()
        model.eval(prompt)
        for _ in range(new_tokens):
            token = int(last_logits(model).argmax())
            out.append(token)
            model.eval([token])
    return out


def last_logits(model: Any) -> np.ndarray:
    """float32 ``[vocab]`` logits of the last token llama.cpp evaluated (works without ``logits_all``)."""
    return np.ctypeslib.as_array(model._ctx.get_logits(), shape=(model.n_vocab(),)).astype(np.float32)


def mean_nll_gap(a: PerplexityResult, b: PerplexityResult) -> float:
    """Relative perplexity difference ``|ppl_a / ppl_b - 1|``."""
    return abs(math.exp(a.mean_nll - b.mean_nll) - 1.0)
