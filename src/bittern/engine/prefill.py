"""The prompt's forward pass (prefill) — eagerly, or replayed from a CUDA graph per (batch, length bucket).

Run eagerly, a prefill launches every kernel of every layer from Python, so a short prompt is bound by the host's
launch time, not by the GPU's work. The graphed prefill captures the whole forward once per batch size and *length
bucket* and replays it.

**Buckets.** A prompt of ``T`` tokens is left-padded to the smallest bucket ``L >= T`` (16, 24, 32, 48, 64, 96,
128, … : powers of two and 1.5 times them, so at most a third of the slots are padding). Left padding is what the
engine already does for rows of different lengths: padding slots sit before the row's first token, its positions
start at 0 at its first real token, real tokens never attend to padding, and decoding continues at slot ``L``. So
the padded prompt computes the same numbers for every real token — for ternary layers bit for bit, as activations
are quantized per token and products are exact integers. A bucket that would not leave room for the new tokens in
``max_seq_len`` is not used: such a prompt runs eagerly at its own length.

**Chunks.** A prompt too long for one prefill (the scheduler's ``prefill_tokens``) is fed in pieces: the first at
slots ``[0, L)`` as above, then chunks of ``C`` tokens at the following slots (:meth:`EagerPrefill.extend`), each
attending to the cache the earlier pieces wrote. The graphed chunk takes its slots as an input (one graph per batch
and chunk length, whatever the start) and so attends over all ``max_seq_len`` slots, masked.

**Memory.** All prefill graphs share one memory pool: they never run at the same time, and each one's logits are
consumed (sampled) before the next prefill replays, so the pool holds about the largest bucket's activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bittern.engine.decoder import Decoder, StaticKVCache
from bittern.engine.graphs import capture_graph

MIN_BUCKET = 16


def bucket_lengths(limit: int) -> list[int]:
    """The prefill buckets up to ``limit`` tokens, ascending: 16, 24, 32, 48, 64, … (``2^k`` and ``1.5 * 2^k``)."""
    lengths: list[int] = []
    size = MIN_BUCKET
    while size <= limit:
        lengths.append(size)
        if size * 3 // 2 <= limit:
            lengths.append(size * 3 // 2)
        size *= 2
    return lengths


def bucket_length(prompt_len: int, new_tokens: int, max_seq_len: int) -> int | None:
    """The bucket a ``prompt_len``-token prompt is padded to, or None when no bucket leaves room for ``new_tokens``
    more in ``max_seq_len`` slots."""
    for length in bucket_lengths(max_seq_len - new_tokens):
        if length >= prompt_len:
            return length
    return None


class EagerPrefill:
    """The prompt's forward run eagerly, at the prompt's own length (CPU, or ``cuda_graph=False``)."""

    def __init__(self, decoder: Decoder, cache: StaticKVCache) -> None:
        self.decoder = decoder
        self.cache = cache

    def length(self, prompt_len: int, new_tokens: int) -> int:
        """The slots the longest prompt of a batch takes: here its own length."""
        return prompt_len

    def __call__(self, input_ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Feed left-padded prompts ``input_ids`` (int64 ``[B, L]``, ``pad`` int64 ``[B]`` padding slots per row)
        into cache slots ``[0, L)``; returns the last slot's logits ``[B, V]`` in the model's dtype."""
        length = input_ids.shape[1]
        slots = self.decoder.slots[:length]
        return self.decoder.forward(input_ids, slots, pad, self.cache, length, last_only=True)[:, -1]

    def extend(self, input_ids: torch.Tensor, start: int, pad: torch.Tensor) -> torch.Tensor:
        """Feed the next ``T`` tokens of prompts already in the cache (int64 ``[B, T]``) into slots
        ``[start, start + T)``, attending to the slots before them; ``pad`` as for :meth:`__call__` (int64 ``[B]``).
        Returns the last slot's logits ``[B, V]`` in the model's dtype."""
        length = input_ids.shape[1]
        slots = self.decoder.slots[start : start + length]
        return self.decoder.forward(input_ids, slots, pad, self.cache, start + length, last_only=True)[:, -1]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # int64 [B, L], copied into before every replay
    pad: torch.Tensor  # int64 [B]
    logits: torch.Tensor  # [B, V], written by every replay
    slots: torch.Tensor | None = None  # int64 [L], a chunk's slots (graphs of extend())


class CudaGraphPrefill(EagerPrefill):
    """The prompt's forward captured in a ``torch.cuda.CUDAGraph`` per (batch size, bucket), replayed per request.

    A prompt that fits no bucket runs eagerly. The returned logits are the graph's output buffer: read them before
    the next call.
    """

    def __init__(self, decoder: Decoder, cache: StaticKVCache) -> None:
        super().__init__(decoder, cache)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.chunk_graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def length(self, prompt_len: int, new_tokens: int) -> int:
        """The bucket of ``prompt_len`` (see the module docstring), or ``prompt_len`` itself when none fits."""
        bucket = bucket_length(prompt_len, new_tokens, self.cache.max_seq_len)
        return prompt_len if bucket is None else bucket

    def _capture(self, input_ids: torch.Tensor, pad: torch.Tensor) -> _Graph:
        """Warm up once (lazy initialisation, kernel autotuning; it writes the cache slots the replay writes, with
        the same values), then capture into the shared pool."""
        input_ids, pad = input_ids.clone(), pad.clone()  # the graph's input buffers
        graph, logits = capture_graph(lambda: EagerPrefill.__call__(self, input_ids, pad), pool=self.pool)
        return _Graph(graph, input_ids, pad, logits)

    def __call__(self, input_ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """As :meth:`EagerPrefill.__call__`, replayed from the graph of this (batch, length) when the length is a
        bucket (captured on first use)."""
        key = tuple(input_ids.shape)
        if key[1] not in bucket_lengths(self.cache.max_seq_len):
            return super().__call__(input_ids, pad)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(input_ids, pad)
        else:
            g.input_ids.copy_(input_ids)
            g.pad.copy_(pad)
        g.graph.replay()
        return g.logits

    def extend(self, input_ids: torch.Tensor, start: int, pad: torch.Tensor) -> torch.Tensor:
        """As :meth:`EagerPrefill.extend`, replayed from the graph of this (batch, chunk length) (captured on first
        use): its slots are an input, its attention reads every slot of the cache (masked)."""
        key = tuple(input_ids.shape)
        slots = self.decoder.slots[start : start + key[1]]
        g = self.chunk_graphs.get(key)
        if g is None:
            input_ids, pad, slots = input_ids.clone(), pad.clone(), slots.clone()
            max_len = self.cache.max_seq_len

            def forward() -> torch.Tensor:
                return self.decoder.forward(input_ids, slots, pad, self.cache, max_len, last_only=True)[:, -1]

            graph, logits = capture_graph(forward, pool=self.pool)
            g = self.chunk_graphs[key] = _Graph(graph, input_ids, pad, logits, slots)
        else:
            assert g.slots is not None
            g.input_ids.copy_(input_ids)
            g.pad.copy_(pad)
            g.slots.copy_(slots)
        g.graph.replay()
        return g.logits
