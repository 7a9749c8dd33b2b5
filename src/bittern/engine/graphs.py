"""The decode step — one token per row through the whole model — eagerly, or replayed from a CUDA graph.

A graph is captured once per batch size, the first time a batch of that size decodes, over static input buffers
(the tokens, the cache slot, the rows' padding) and the engine's static KV cache; every later step copies its
inputs into those buffers and replays the graph. Sampling runs outside the graph, on its logits buffer.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

from bittern import kernels
from bittern.engine.decoder import Decoder, StaticKVCache
from bittern.engine.sampling import greedy_tokens

DEPENDENT_LAUNCH_ENV = "BITTERN_DEPENDENT_LAUNCH"
"""Set to ``0`` to capture the decode step without programmatic dependent launch (to compare)."""


@contextlib.contextmanager
def dependent_launches(device: torch.device) -> Iterator[None]:
    """Capture (and compile) the decode step with programmatic dependent launch on Hopper and newer GPUs: the
    ternary decode kernels (:func:`bittern.kernels.static_weights` — the engine never writes its weights) and the
    kernels inductor generates (``torch._inductor.config.triton.enable_pdl``, where this torch has it) start
    while the kernel before them finishes, and wait for it before touching what it wrote. A block that changes
    nothing elsewhere, or with ``BITTERN_DEPENDENT_LAUNCH=0``."""
    wanted = (os.environ.get(DEPENDENT_LAUNCH_ENV, "1") != "0" and device.type == "cuda"
              and torch.cuda.get_device_capability(device)[0] >= 9)  # fmt: skip
    if not wanted:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(kernels.static_weights())
        import torch._inductor.config as inductor_config

        if hasattr(inductor_config.triton, "enable_pdl"):
            stack.enter_context(inductor_config.patch({"triton.enable_pdl": True}))
        yield


_Output = TypeVar("_Output")


def capture_graph(
    run: Callable[[], _Output],
    *,
    warm_up: Callable[[], object] | None = None,
    warm_up_runs: int = 1,
    pool: tuple[int, int] | None = None,
) -> tuple[torch.cuda.CUDAGraph, _Output]:
    """Capture one call of ``run`` in a ``torch.cuda.CUDAGraph`` and return the graph and the call's output (the
    graph's output tensors, rewritten by every replay).

    Before the capture, on a side stream (so that lazy initialisation, compilation, autotuning and the allocator's
    first requests happen outside it), ``warm_up`` runs once if given, then ``run`` ``warm_up_runs`` times. ``run``
    must read its inputs from buffers the caller fills before each replay, and must be harmless to run again (the
    engine's steps rewrite the cache slots the replay writes, with the same values). ``pool``: a memory pool shared
    with other graphs that never run at the same time (``torch.cuda.graph_pool_handle()``); None gives the graph a
    pool of its own."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        if warm_up is not None:
            warm_up()
        for _ in range(warm_up_runs):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = run()
    return graph, output


PERSISTENT_ROW_LIMIT = 8192
"""Widest row (elements) that :func:`rows_in_one_pass` has inductor reduce in one pass."""


@contextlib.contextmanager
def rows_in_one_pass(limit: int = PERSISTENT_ROW_LIMIT) -> Iterator[None]:
    """Compile, in this block, every row reduction up to ``limit`` wide (norms, the activations' absmax) as a
    persistent reduction: the whole row held in registers and reduced once, where inductor's default (rows over
    1024) loops over the row in pieces, once per reduction. A decode step has one row per sequence, so each of
    those kernels is a single program whose loops run one after another; reducing the row once makes each of them
    shorter (docs/notes/inference-tuning.md). A block that changes nothing where this torch's inductor has no
    choices handler. The handler is not part of inductor's FX-graph cache key: a step compiled and cached without
    it (by an older bittern) is loaded as it was, slower but equal in value."""
    try:
        from torch._inductor.choices import InductorChoices
        from torch._inductor.runtime.hints import ReductionHint
        from torch._inductor.virtualized import V
    except ImportError:
        yield
        return

    class _RowsInOnePass(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction):  # type: ignore[no-untyped-def]
            if features.get_reduction_hint() == ReductionHint.INNER and V.graph.sizevars.statically_known_leq(
                features.reduction_numel, limit
            ):
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    with V.set_choices_handler(_RowsInOnePass()):
        yield


class EagerDecodeStep:
    """The decode step run eagerly (CPU, or ``cuda_graph=False``)."""

    def __init__(self, decoder: Decoder, cache: StaticKVCache) -> None:
        self.decoder = decoder
        self.cache = cache
        self.last_argmax: torch.Tensor | None = None
        """The greedy token of every row from the last call, where the step computes it (here: never)."""

    def __call__(self, tokens: torch.Tensor, slot: int, pad: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` (int64 ``[B]``) at cache slot ``slot``; returns the next-token logits ``[B, V]``.

        ``pad``: int64 ``[B]`` left-padding slots of each row. Attention reads the slots filled so far
        (``slot + 1``), where the graphed step reads all of them (masked): the same numbers, less work.
        """
        slots = torch.full((1,), slot, dtype=torch.long, device=tokens.device)
        logits = self.decoder.forward(tokens[:, None], slots, pad, self.cache, slot + 1)
        return logits[:, 0]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # int64 [B, 1]
    slot: torch.Tensor  # int64 [1]
    pad: torch.Tensor  # int64 [B]
    logits: torch.Tensor  # [B, V], written by every replay
    argmax: torch.Tensor  # int64 [B], the logits' argmax, written by every replay


class CudaGraphDecodeStep:
    """The decode step captured in a ``torch.cuda.CUDAGraph`` per batch size, replayed per token.

    The returned logits are the graph's output buffer: read (or copy) them before the next call. The graph also
    computes their argmax (:attr:`last_argmax`, the greedy token, by :func:`~bittern.engine.sampling.greedy_tokens`:
    two reductions spread over the GPU, where ``argmax`` runs one program per row over the whole vocabulary).
    """

    WARMUP_RUNS = 2

    def __init__(self, decoder: Decoder, cache: StaticKVCache, compile: bool = True) -> None:
        self.decoder = decoder
        self.cache = cache
        self.graphs: dict[int, _Graph] = {}
        # Compiled, the step's elementwise work (norms, rope, residuals, masks: some 60 small kernels per layer,
        # each a few microseconds even inside a graph) fuses into a few kernels per layer; the ternary layers stay
        # single custom-op kernels. Compilation happens in the first warm-up, before capture.
        self.compiled = compile
        self._forward = torch.compile(self._step, dynamic=False) if compile else self._step
        self.last_argmax: torch.Tensor | None = None
        """The greedy token (int64 ``[B]``) of every row from the last call: a graph output buffer, like the
        logits."""

    def _step(
        self, tokens: torch.Tensor, slot: torch.Tensor, pad: torch.Tensor, cache: StaticKVCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next-token logits ``[B, V]`` of ``tokens`` ``[B, 1]`` at cache slot ``slot`` ``[1]``, and their argmax
        ``[B]`` (in float32, as :class:`~bittern.engine.sampling.Sampler` takes it)."""
        logits = self.decoder.forward(tokens, slot, pad, cache, cache.max_seq_len)[:, 0]
        return logits, greedy_tokens(logits)

    def _run(self, tokens: torch.Tensor, slot: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._forward(tokens, slot, pad, self.cache)

    def _first_run(self, tokens: torch.Tensor, slot: torch.Tensor, pad: torch.Tensor) -> None:
        """The step's first run (it compiles): if compilation fails, warn and go on with the uncompiled step."""
        try:
            self._run(tokens, slot, pad)
        except Exception as error:  # a model torch.compile cannot handle still decodes, eagerly-fused or not
            if not self.compiled:
                raise
            warnings.warn(f"torch.compile of the decode step failed ({type(error).__name__}: {error}); "
                          "capturing the uncompiled step", stacklevel=5)  # fmt: skip
            self.compiled = False
            self._forward = self._step

    def _capture(self, tokens: torch.Tensor, slot: int, pad: torch.Tensor) -> _Graph:
        """Capture the step over new input buffers holding these inputs (its warm-up runs write the cache slots the
        replay writes, with the same values); a private memory pool per graph: they replay in any order."""
        buffers = (tokens[:, None].clone(), torch.full((1,), slot, dtype=torch.long, device=tokens.device), pad.clone())
        with dependent_launches(tokens.device), rows_in_one_pass():
            graph, (logits, argmax) = capture_graph(
                lambda: self._run(*buffers), warm_up=lambda: self._first_run(*buffers), warm_up_runs=self.WARMUP_RUNS
            )
        g = self.graphs[tokens.shape[0]] = _Graph(graph, *buffers, logits, argmax)
        return g

    def __call__(self, tokens: torch.Tensor, slot: int, pad: torch.Tensor) -> torch.Tensor:
        """As :meth:`EagerDecodeStep.__call__`, from the graph of this batch size (captured on first use)."""
        g = self.graphs.get(tokens.shape[0])
        if g is None:
            g = self._capture(tokens, slot, pad)
        else:
            g.tokens.copy_(tokens[:, None])
            g.slot.fill_(slot)
            g.pad.copy_(pad)
        g.graph.replay()
        self.last_argmax = g.argmax
        return g.logits
