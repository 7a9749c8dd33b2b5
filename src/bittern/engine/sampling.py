"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p, after an optional
repetition penalty — through transformers' logits processors, in the order ``generate`` applies them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bittern.errors import ConfigError

ARGMAX_CHUNKS = 256
"""Pieces :func:`greedy_tokens` cuts a row of logits into."""


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.float().argmax(-1)`` for ``[B, V]`` logits (int64 ``[B]``; the first of equal maxima, as
    ``argmax`` picks it), computed in two reductions: the maximum of each of :data:`ARGMAX_CHUNKS` pieces of a row,
    then the first piece holding the row's maximum. Compiled into the decode step, ``argmax`` over a whole row is
    one program walking the whole vocabulary at batch 1; the pieces spread it over the GPU. NaN counts as the
    maximum, as in ``argmax``."""
    rows, vocab = logits.shape
    width = -(-vocab // ARGMAX_CHUNKS)
    padded = torch.nn.functional.pad(logits.float(), (0, width * ARGMAX_CHUNKS - vocab), value=float("-inf"))
    values, where = padded.view(rows, ARGMAX_CHUNKS, width).max(dim=-1)  # [B, C]: first maximum of each piece
    piece = values.argmax(dim=-1, keepdim=True)  # [B, 1]: first piece holding the row's maximum
    return (piece * width + where.gather(-1, piece))[:, 0]


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen.

    Attributes:
        temperature: 0 (or None) for greedy decoding; otherwise logits are divided by it and a token is sampled.
        top_k: sample among the ``top_k`` most likely tokens (None or 0: all).
        top_p: sample among the smallest set of tokens whose probability reaches ``top_p`` (None or 1: all).
        repetition_penalty: > 1 discourages tokens already in the row (prompt included), as transformers does:
            positive logits are divided by it, negative ones multiplied (None or 1: off). Applies to greedy too.
        seed: seed of the sampling generator (None: torch's global generator).
    """

    temperature: float | None = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature is not None and not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), not {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0):
            raise ConfigError(f"top_k must be a non-negative integer, not {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1], not {self.top_p}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0, not {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return not self.temperature

    @property
    def uses_history(self) -> bool:
        """Whether the processors need the tokens of each row so far (the repetition penalty does)."""
        return self.repetition_penalty is not None and self.repetition_penalty != 1.0


class Sampler:
    """Applies :class:`SamplingParams` to a batch of logits.

    Args:
        params: the choice of decoding.
        device: where the logits live (the sampling generator is created there).
    """

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.params = params
        self.processors = LogitsProcessorList()
        if params.uses_history:
            self.processors.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
        if not params.greedy:
            if params.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(float(params.temperature)))
            if params.top_k:
                self.processors.append(TopKLogitsWarper(int(params.top_k)))
            if params.top_p is not None and params.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(float(params.top_p)))
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(int(params.seed))

    @property
    def plain_greedy(self) -> bool:
        """Whether the next token is the logits' argmax, nothing applied first (greedy, no repetition penalty)."""
        return self.params.greedy and not len(self.processors)

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        """The next token of every row.

        Args:
            logits: ``[B, V]`` scores of the next token, any floating dtype (processed in float32).
            history: int64 ``[B, L]`` tokens of every row so far (needed only for the repetition penalty).

        Returns:
            int64 ``[B]`` on the logits' device (no host synchronisation).
        """
        scores = logits.float()
        if len(self.processors):
            scores = self.processors(history, scores)
        if self.params.greedy:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
