"""Continuous batching: requests join and leave a running batch between decode steps.

A :class:`Scheduler` owns an :class:`~bittern.engine.Engine` and drives it from one background thread. The engine's
static KV cache holds ``max_batch`` *rows*; each running request owns one row. Every iteration of the thread:

1. takes new requests and cancellations from the callers' threads;
2. **admits** waiting requests (first come, first served) into free rows: their prompts are prefilled together,
   left-padded, into a separate prefill cache (:class:`~bittern.engine.prefill.EagerPrefill`, or the CUDA-graphed
   :class:`~bittern.engine.prefill.CudaGraphPrefill` per batch and length bucket on a GPU), their first tokens are
   chosen on the device (on a GPU the host takes them in the next iteration, as it takes a decode step's:
   admission never waits for the GPU), and their keys and values are copied into the rows they take;
3. launches **one decode step** over the running rows with the engine's own decode step
   (:class:`~bittern.engine.graphs.EagerDecodeStep` on the CPU, :class:`~bittern.engine.graphs.CudaGraphDecodeStep`
   on a GPU: one graph per batch bucket 1, 2, 4, 8, …, ``max_batch``) and samples every row with its own
   parameters and generator, on the device: each row's token becomes its next input without visiting the host;
4. while the GPU runs that step, takes the *previous* iteration's tokens on the host (text, stop strings, events) and
   frees a row the moment its request ends (end of sequence, stop string, ``max_tokens``, or cancelled — a client
   gone). A request that ended at EOS or a stop string is computed in one more step, whose token is dropped.

**Positions.** The decode step writes every row's new token at one cache slot, the *clock*; each row keeps its own
rope positions through its left padding (``pad``, :mod:`bittern.engine.decoder`): a request admitted at clock ``t``
with a ``P``-token prompt takes slots ``[t - P, t)`` of its row with ``pad = t - P``, so its tokens sit at
positions ``0, 1, …`` exactly as when it runs alone, and it sees only its own slots. A request then needs the slots
up to ``t + max_tokens - 1``; when the span from the oldest running row's first slot to the furthest slot any row
may need would pass the cache's end (or a prompt is longer than the clock), the rows' slots are shifted (keys and
values copied, pads and clock moved together: positions do not change). A request whose span cannot fit next to
the running ones waits until enough of them end. Running rows are kept at the lowest row indices (a row that
ends is replaced by the highest one), so the decode step runs the smallest bucket that holds them.

**Guarantees.** A greedy request produces the tokens it produces alone (``Engine.generate_ids`` with one prompt),
whatever runs beside it (for a prompt prefilled in chunks, see below); a seeded sampled request produces the same
tokens on every run, whatever runs beside it (its own ``torch.Generator`` draws one exponential variate per
vocabulary entry per token: ``argmax(p / E)`` is a sample of ``p``).

**Long prompts.** One prefill forward computes at most ``prefill_tokens`` slots (prompts x padded length), so that
the running rows wait at most that long between two decode steps. A prompt longer than that is prefilled in
*chunks*, one per iteration, in the prefill cache (:meth:`~bittern.engine.prefill.EagerPrefill.extend`: each chunk
attends to the keys and values the earlier ones wrote): first the remainder, padded to its bucket, then pieces of
``prefill_tokens`` tokens; the running rows take a decode step after each. Admission waits behind it (first come,
first served); after its last chunk the request takes a row like any other. Its linear layers compute the numbers
one forward computes, its attention the same sums in another order (a chunk's queries read the cached keys of the
earlier chunks), so its logits may differ from a whole prompt's by rounding: its greedy tokens are the same unless
two candidates tie within that rounding (the tests check long prompts against ``Engine.generate_ids``).

While a scheduler runs, it is the engine's only user: do not call the engine's ``generate`` at the same time.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bittern.engine.decoder import StaticKVCache
from bittern.engine.detokenize import IncrementalText
from bittern.engine.engine import Engine
from bittern.engine.prefill import CudaGraphPrefill, EagerPrefill, bucket_lengths
from bittern.errors import BitternError, ConfigError

DEFAULT_MAX_QUEUE = 256
DEFAULT_PREFILL_ROWS = 8
DEFAULT_PREFILL_TOKENS = 2048
MAX_LOGPROBS = 20


class ContextLengthError(ConfigError):
    """A prompt (plus the tokens asked for) longer than the engine's ``max_seq_len``."""


class QueueFullError(BitternError):
    """The scheduler's waiting queue is full: try again later."""


class SchedulerClosedError(BitternError):
    """The scheduler is shutting down (or was never started) and takes no new requests."""


@dataclass(frozen=True)
class Request:
    """One generation request.

    Attributes:
        prompt_ids: the prompt's token ids (non-empty, each in ``[0, vocab)``).
        max_tokens: the most tokens generated (>= 1); ``len(prompt_ids) + max_tokens <= max_seq_len``.
        temperature: 0 for greedy decoding; otherwise the logits are divided by it and a token is sampled.
        top_p: sample among the smallest set of most likely tokens whose probability reaches it ((0, 1]; None: 1).
        top_k: sample among the ``top_k`` most likely tokens (None or 0: all).
        seed: seed of this request's own sampling generator (None: the scheduler's shared generator).
        stop: stop strings: the request ends when its text contains one; its text ends just before it.
        ignore_eos: keep generating after an end-of-sequence token (benchmarks).
        logprobs: None, or report each chosen token's log-probability and the ``logprobs`` (<= 20) most likely
            tokens' (of the model's distribution, before temperature and top-p/top-k).
    """

    prompt_ids: Sequence[int]
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability (natural log) and the most likely alternatives ``[(token_id, logprob)]``."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What a request produced since its last event (one per generated token, and one that ends it).

    Attributes:
        request_id: the id :meth:`Scheduler.submit` returned.
        text: new text (a tail that may be the start of a stop string is held back until it is known).
        token_ids: the new token ids (an end-of-sequence token included; none after a stop string).
        logprobs: one entry per new token id, when the request asked for them.
        finish_reason: None while running; then ``"eos"``, ``"stop"`` (a stop string), ``"length"``
            (``max_tokens``), ``"cancelled"`` or ``"error"``.
        prompt_tokens, completion_tokens: the usage so far (completion tokens counted as generated, EOS included).
        error: the message of an ``"error"`` finish.
        time: ``time.perf_counter()`` when the engine thread produced it (seconds).
    """

    request_id: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    time: float = 0.0


@dataclass
class Completion:
    """A finished request, all its events gathered (:meth:`RequestHandle.result`)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None


def _counter(help: str, zero: float = 0) -> Any:
    """A :class:`SchedulerStats` field starting at ``zero``, described by ``help`` (also the metric's help line)."""
    return field(default=zero, metadata={"help": help})


@dataclass
class SchedulerStats:
    """Cumulative counters of a scheduler's engine thread (each field's ``metadata["help"]`` says what it counts).
    Read from any thread: each value is current, the set may be one step apart. Seconds are host wall time
    (``time.perf_counter``)."""

    decode_steps: int = _counter("Decode steps launched.")
    decode_rows: int = _counter("Rows decode steps computed (batch buckets, rows without a request included).")
    decode_tokens: int = _counter("Tokens decode steps computed for running requests.")
    prefills: int = _counter(
        "Prefill forwards run (each admits a group of waiting requests, or is one chunk of a long prompt)."
    )
    prefill_tokens: int = _counter("Prompt tokens prefilled.")
    prefill_slots: int = _counter("Slots prefill forwards computed (rows x padded length, padding included).")
    prefill_seconds: float = _counter(
        "Host seconds admitting requests: the prefill forward, choosing first tokens, copying keys and values into "
        "the rows (on a GPU: launching them).",
        0.0,
    )
    prefill_gpu_seconds: float = _counter("GPU seconds of admissions, prefill to keys and values in place (CUDA).", 0.0)
    decode_gpu_seconds: float = _counter("GPU seconds of decode steps, sampling included (CUDA).", 0.0)
    wait_seconds: float = _counter("Host seconds waiting for launched tokens to reach it (the GPU working ahead).", 0.0)
    shifts: int = _counter("Times the rows' slots were shifted to make room.")
    cancelled: int = _counter("Requests cancelled (waiting or running).")


EventCallback = Callable[[Event], None]
"""Receives every :class:`Event` of a request, on the scheduler's thread: it must return quickly and not raise."""


class RequestHandle:
    """A submitted request: its id, its cancellation, and (without a callback) its events.

    Without a callback, the events queue up in the handle: :meth:`events` iterates them, :meth:`result` gathers them.
    """

    def __init__(self, scheduler: Scheduler, request_id: int) -> None:
        self.scheduler = scheduler
        self.id = request_id
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def _put(self, event: Event) -> None:
        self._events.put(event)

    def cancel(self) -> None:
        """Ask the scheduler to end this request (it frees its row at the next step; a finished one is left)."""
        self.scheduler.cancel(self.id)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The request's events until the finishing one (``timeout``: seconds to wait for each)."""
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the request to end and return everything it produced."""
        text, ids, logprobs = [], [], []
        for event in self.events(timeout):
            text.append(event.text)
            ids += event.token_ids
            logprobs += event.logprobs or []
            last = event
        return Completion("".join(text), ids, last.finish_reason or "", last.prompt_tokens, last.completion_tokens,
                          logprobs or None, last.error)  # fmt: skip


@dataclass(eq=False)
class _Running:
    """A request on the engine thread: waiting, then in a row."""

    id: int
    request: Request
    callback: EventCallback
    text: IncrementalText | None
    generator: torch.Generator | None
    start: int = 0  # the row's pad: first slot of the prompt
    end: int = 0  # one past the last slot it may write
    launched: int = 0  # tokens asked of the GPU (the prefill's and each decode step's)
    generated: int = 0  # tokens the host has taken
    done: bool = False  # its finishing event was emitted

    @property
    def greedy(self) -> bool:
        return not self.request.temperature

    @property
    def decoding(self) -> bool:
        """Whether the next decode step should compute a token for it (it may still end at EOS or a stop)."""
        return not self.done and self.launched < self.request.max_tokens


_Logprobs = tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor, torch.Tensor]
"""Log-probabilities on the device: ``(entry index, how many top tokens)`` of the entries that want them, then
float32 ``[m]`` the chosen tokens', ``[m, w]`` the top values and int64 ``[m, w]`` their ids."""


@dataclass
class _Pending:
    """Tokens chosen on the device (by a decode step, or by a prefill: the first tokens): their entries, the tokens
    (and log-probabilities) on their way to the host, and the event that marks their arrival."""

    entries: list[_Running]
    tokens: torch.Tensor
    logprobs: _Logprobs | None
    ready: torch.cuda.Event | None
    started: torch.cuda.Event | None  # recorded before the work that chose the tokens (CUDA)
    prefill: bool  # a prefill's first tokens (else a decode step's)
    earlier: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)  # a long prompt's chunks


@dataclass(eq=False)
class _Chunked:
    """A prompt prefilled in chunks over several iterations (row 0 of the prefill cache).

    The first chunk is the prompt's first ``first`` tokens, left-padded by ``pad`` slots; each later one takes
    ``size`` tokens at the next slots. After the last, ``chosen`` holds the first token (and ``logprobs`` its
    log-probabilities) until the request takes a row."""

    entry: _Running
    first: int
    pad: int
    size: int
    done: int = 0  # prompt tokens prefilled
    slot: int = 0  # the next chunk's first slot in the prefill cache
    chosen: torch.Tensor | None = None
    logprobs: _Logprobs | None = None
    started: torch.cuda.Event | None = None  # before the last chunk (CUDA)
    earlier: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)  # the other chunks


class Scheduler:
    """Continuous batching over an :class:`Engine` (see the module docstring).

    Args:
        engine: the engine to drive; its ``max_batch`` is the number of rows, its ``max_seq_len`` the longest
            prompt + generation. It needs a tokenizer for text and stop strings (token ids work without one).
        max_queue: the most requests waiting for a row; :meth:`submit` raises :class:`QueueFullError` beyond.
        prefill_rows: the most prompts prefilled in one forward (rows of the prefill cache).
        prefill_tokens: the most slots (prompts x padded length) prefilled in one forward, so that a burst of
            arrivals does not stall the running rows for long; a longer prompt is prefilled in chunks of this many
            tokens, one per decode step.
        seed: seed of the generator shared by sampled requests without a seed (None: torch's default generator).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        prefill_rows: int = DEFAULT_PREFILL_ROWS,
        prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
        seed: int | None = None,
    ) -> None:
        for name, value in (("max_queue", max_queue), ("prefill_rows", prefill_rows),
                            ("prefill_tokens", prefill_tokens)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, not {value!r}")
        self.engine = engine
        self.max_batch = engine.max_batch
        self.max_seq_len = engine.max_seq_len
        self.max_queue = max_queue
        self.prefill_rows = min(prefill_rows, engine.max_batch)
        self.prefill_tokens = prefill_tokens
        self.device = engine.device
        self.vocab = engine.decoder.embed.num_embeddings
        self.eos = set(engine.eos_token_ids)
        self.buckets = self._buckets()
        self._generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        self._lock = threading.Condition()
        self._inbox: deque[_Running] = deque()
        self._cancels: set[int] = set()
        self._known: set[int] = set()  # ids submitted and not finished (guarded by the lock)
        self._ids = itertools.count(1)
        self._closing = False
        self._cancel_all = False
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        # engine-thread state
        self._waiting: deque[_Running] = deque()
        self._rows: list[_Running | None] = [None] * self.max_batch
        self._clock = 0
        self._prefill_cache: StaticKVCache | None = None
        self._prefill: EagerPrefill | CudaGraphPrefill | None = None
        self._chunked: _Chunked | None = None  # a long prompt being prefilled in chunks
        self._next = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)  # each row's next input
        self._pending: deque[_Pending] = deque()  # tokens launched and not yet taken by the host, oldest first
        self.stats = SchedulerStats()
        """What the engine thread has done so far."""

    # --- callers' side -----------------------------------------------------------------------------------------

    def _buckets(self) -> list[int]:
        """Batch sizes the decode step runs: every size on the CPU; powers of two and ``max_batch`` with graphs."""
        if not self.engine.cuda_graph:
            return list(range(1, self.max_batch + 1))
        sizes = [1 << i for i in range(self.max_batch.bit_length()) if 1 << i < self.max_batch]
        return [*sizes, self.max_batch]

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a row (approximate while the engine thread runs)."""
        return len(self._inbox) + len(self._waiting) + (self._chunked is not None)

    @property
    def running(self) -> int:
        """Rows holding a request (approximate while the engine thread runs)."""
        return sum(row is not None for row in self._rows)

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs and takes requests."""
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def start(self) -> Scheduler:
        """Start the engine thread (once); returns the scheduler."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="bittern-scheduler", daemon=True)
            self._thread.start()
        return self

    def warm_up(self, max_prompt_len: int | None = None) -> None:
        """Before :meth:`start`: capture (on a GPU) every decode-step graph (one per batch bucket) and every prefill
        graph admission can use (one prompt of each length bucket up to ``max_prompt_len``, default
        ``max_seq_len``, groups of prompts within ``prefill_tokens``, and a long prompt's chunk), so that no request
        waits for a capture
        (a compiled decode step takes tens of seconds per bucket). Does nothing without CUDA graphs. It writes
        meaningless keys and values into the caches, which no request reads.

        Raises:
            ConfigError: the scheduler is already running.
        """
        if self._thread is not None:
            raise ConfigError("warm_up() must run before start()")
        if not self.engine.cuda_graph:
            return
        device = self.device
        with torch.inference_mode():
            step = self.engine._decode_step()
            for batch in self.buckets:
                zeros = torch.zeros(batch, dtype=torch.long, device=device)
                step(zeros, 0, zeros)
            runner = self._prefill_runner()
            limit = min(max_prompt_len or self.max_seq_len, self.max_seq_len)
            every = bucket_lengths(self.max_seq_len)
            lengths = [n for i, n in enumerate(every) if i == 0 or every[i - 1] < limit]
            for rows in sorted({self._group_rows(n) for n in range(1, self.prefill_rows + 1)}):
                for length in lengths:
                    if rows == 1 or rows * length <= self.prefill_tokens:
                        ids = torch.zeros((rows, length), dtype=torch.long, device=device)
                        runner(ids, torch.zeros(rows, dtype=torch.long, device=device))
            if limit > self.prefill_tokens:  # a long prompt's chunks
                ids = torch.zeros((1, self.prefill_tokens), dtype=torch.long, device=device)
                runner.extend(ids, 0, torch.zeros(1, dtype=torch.long, device=device))
            self.engine._sync()

    def check(self, request: Request) -> None:
        """Raise :class:`ConfigError` (or :class:`ContextLengthError`) when ``request`` cannot run."""
        ids = list(request.prompt_ids)
        if not ids:
            raise ConfigError("the prompt has no tokens")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in ids) or min(ids) < 0 or max(ids) >= self.vocab:
            raise ConfigError(f"the prompt holds token ids outside the vocabulary [0, {self.vocab})")
        tokens = request.max_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer, not {tokens!r}")
        if len(ids) + tokens > self.max_seq_len:
            raise ContextLengthError(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({tokens}) exceeds the context of "
                f"{self.max_seq_len} tokens"
            )
        if not request.temperature >= 0 or request.temperature != request.temperature:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), not {request.temperature}")
        if request.top_p is not None and not 0 < request.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1], not {request.top_p}")
        if request.top_k is not None and (isinstance(request.top_k, bool) or request.top_k < 0):
            raise ConfigError(f"top_k must be a non-negative integer, not {request.top_k}")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
            raise ConfigError(f"logprobs must lie in [0, {MAX_LOGPROBS}], not {request.logprobs}")
        if request.stop and self.engine.tokenizer is None:
            self.engine._require_tokenizer("stop strings")

    def submit(self, request: Request, callback: EventCallback | None = None) -> RequestHandle:
        """Queue ``request``; its events go to ``callback`` (on the engine thread) or, without one, to the handle.

        Raises:
            ConfigError: the request is invalid (:class:`ContextLengthError`: beyond the context).
            QueueFullError: ``max_queue`` requests are already waiting.
            SchedulerClosedError: the scheduler is not running or is shutting down.
        """
        self.check(request)
        with self._lock:
            if self._closing or self._thread is None or not self._thread.is_alive():
                raise SchedulerClosedError("the scheduler is not running (shut down, or not started)")
            if self.queue_depth >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests are already waiting; try again later")
            handle = RequestHandle(self, next(self._ids))
            text = IncrementalText(self.engine.tokenizer, request.stop) if self.engine.tokenizer is not None else None
            generator = None
            if request.seed is not None and request.temperature:
                generator = torch.Generator(device=self.device).manual_seed(int(request.seed))
            self._inbox.append(_Running(handle.id, request, callback or handle._put, text, generator))
            self._known.add(handle.id)
            self._lock.notify()
        return handle

    def cancel(self, request_id: int) -> None:
        """End request ``request_id`` (waiting or running) with finish reason ``"cancelled"``; unknown or finished
        ids are ignored."""
        with self._lock:
            if request_id in self._known:
                self._cancels.add(request_id)
                self._lock.notify()

    def generate(self, request: Request, timeout: float | None = None) -> Completion:
        """Submit ``request`` and wait for it (a blocking convenience for scripts and tests)."""
        return self.submit(request).result(timeout)

    def shutdown(self, timeout: float | None = None) -> None:
        """Take no new requests, let the running and waiting ones finish for up to ``timeout`` seconds (None:
        until they end), cancel what is left, and stop the engine thread."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        thread = self._thread
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            with self._lock:
                self._cancel_all = True
                self._lock.notify()
            thread.join()

    # --- engine thread ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._inbox or self._cancels or self._waiting or self._chunked or self.running
                               or self._closing):  # fmt: skip
                        self._lock.wait()
                    incoming = list(self._inbox)
                    self._inbox.clear()
                    cancels = set(self._cancels)
                    self._cancels.clear()
                    cancel_all = self._cancel_all
                    closing = self._closing
                self._waiting.extend(incoming)
                if cancel_all:
                    cancels |= {r.id for r in self._waiting} | {r.id for r in self._rows if r is not None}
                    cancels |= {self._chunked.entry.id} if self._chunked else set()
                if cancels:
                    self._cancel(cancels)
                if closing and not self._waiting and not self._chunked and not self.running:
                    return
                try:
                    earlier = len(self._pending)
                    self._admit()
                    if self.running:
                        self._launch()
                    for _ in range(earlier):  # the host's share of the last iteration, while the GPU runs this one
                        self._process(self._pending.popleft())
                except Exception as error:  # a failed step ends the requests it touched; the thread goes on
                    self._fail_running(error)

    def _emit(self, entry: _Running, event: Event) -> None:
        event.time = time.perf_counter()
        event.prompt_tokens = len(entry.request.prompt_ids)
        event.completion_tokens = entry.generated
        if event.finish_reason is not None:
            entry.done = True
            with self._lock:
                self._known.discard(entry.id)
        with contextlib.suppress(Exception):  # a caller's callback must not stop the engine
            entry.callback(event)

    def _cancel(self, ids: set[int]) -> None:
        if self._chunked is not None and self._chunked.entry.id in ids:
            entry, self._chunked = self._chunked.entry, None
            self.stats.cancelled += 1
            self._emit(entry, Event(entry.id, finish_reason="cancelled"))
        for entry in [r for r in self._waiting if r.id in ids]:
            self._waiting.remove(entry)
            self.stats.cancelled += 1
            self._emit(entry, Event(entry.id, finish_reason="cancelled"))
        for index, entry in enumerate(self._rows):
            if entry is not None and entry.id in ids:
                self._rows[index] = None
                self.stats.cancelled += 1
                self._emit(entry, Event(entry.id, finish_reason="cancelled"))

    def _fail_running(self, error: Exception) -> None:
        self._pending.clear()
        message = f"{type(error).__name__}: {error}"
        for index, entry in enumerate(self._rows):
            if entry is not None:
                self._rows[index] = None
                self._emit(entry, Event(entry.id, finish_reason="error", error=message))

    # --- admission ------------------------------------------------------------------------------------------------

    def _prefill_runner(self) -> EagerPrefill | CudaGraphPrefill:
        if self._prefill is None:
            self._prefill_cache = self.engine.decoder.new_cache(self.prefill_rows)
            runner = CudaGraphPrefill if self.engine.cuda_graph else EagerPrefill
            self._prefill = runner(self.engine.decoder, self._prefill_cache)
        return self._prefill

    def _group_rows(self, count: int) -> int:
        """Rows of the prefill forward for ``count`` prompts: with graphs, the next power of two (fewer graphs)."""
        if not self.engine.cuda_graph:
            return count
        return min(1 << (count - 1).bit_length(), self.prefill_rows)

    def _span_shift(self, new: list[_Running]) -> int | None:
        """The shift of every row's slots that lets ``new`` (prompt and generation) join at the clock, or None
        when their spans and the running rows' cannot fit in the cache together."""
        clock = self._clock if self.running else max(len(r.request.prompt_ids) for r in new)
        starts = [r.start for r in self._rows if r is not None]
        ends = [r.end for r in self._rows if r is not None]
        starts += [clock - len(r.request.prompt_ids) for r in new]
        ends += [clock + r.request.max_tokens - 1 for r in new]
        low, high = min(starts), max(ends)
        if high - low > self.max_seq_len:
            return None
        return min(max(0, -low), self.max_seq_len - high) + (clock - self._clock)

    def _admit(self) -> None:
        """Prefill the first waiting requests that fit into free rows (one forward), and give them rows; or run the
        next chunk of a long prompt (and give it a row after its last)."""
        free = self.max_batch - self.running
        if not self._chunked and (not self._waiting or not free):
            return
        try:
            runner = self._prefill_runner()
        except Exception as error:  # e.g. no memory for the prefill cache: the request fails, not the thread
            entry = self._waiting.popleft()
            self._emit(entry, Event(entry.id, finish_reason="error", error=f"{type(error).__name__}: {error}"))
            return
        group: list[_Running] = []
        shift = 0
        while not self._chunked and self._waiting and len(group) < min(free, self.prefill_rows):
            candidate = [*group, self._waiting[0]]
            longest = max(len(r.request.prompt_ids) for r in candidate)
            length = runner.length(longest, 0)
            if group and self._group_rows(len(candidate)) * length > self.prefill_tokens:
                break
            if not group and longest > self.prefill_tokens:  # too long for one forward: prefilled in chunks
                self._chunked = self._chunk_plan(self._waiting.popleft(), runner)
                break
            fits = self._span_shift(candidate)
            if fits is None:
                break
            group.append(self._waiting.popleft())
            shift = fits
        started = time.perf_counter()
        try:
            if self._chunked is not None:
                group = [self._chunked.entry]
                self._chunk_step(runner)
            elif group:
                self._prefill_group(group, runner, shift)
        except Exception as error:  # only this group's requests fail; the running rows go on
            self._chunked = None
            self._rows = [None if any(r is e for e in group) else r for r in self._rows]
            for entry in group:
                if not entry.done:
                    self._emit(entry, Event(entry.id, finish_reason="error", error=f"{type(error).__name__}: {error}"))
        finally:
            self.stats.prefill_seconds += time.perf_counter() - started

    def _chunk_plan(self, entry: _Running, runner: EagerPrefill | CudaGraphPrefill) -> _Chunked:
        """How ``entry``'s long prompt is prefilled: chunks of ``prefill_tokens`` tokens after a first one holding
        the remainder, padded to its bucket where the whole still fits the prefill cache."""
        size = self.prefill_tokens
        length = len(entry.request.prompt_ids)
        first = length - (length - 1) // size * size  # in [1, size]
        pad = runner.length(first, length - first) - first
        return _Chunked(entry, first, pad, size)

    def _chunk_step(self, runner: EagerPrefill | CudaGraphPrefill) -> None:
        """Run the long prompt's next chunk; after its last, choose its first token and give it a row when its span
        fits next to the running rows' (else it waits, keeping its cache, until rows end)."""
        chunked = self._chunked
        assert chunked is not None
        entry = chunked.entry
        prompt = list(entry.request.prompt_ids)
        if chunked.chosen is None:
            started = self._gpu_event()
            pad = self._tensor([chunked.pad])
            if chunked.done == 0:
                tokens = prompt[: chunked.first]
                ids = [self.engine.pad_token_id] * chunked.pad + tokens
                logits = runner(self._tensor([ids]), pad)
            else:
                tokens = ids = prompt[chunked.done : chunked.done + chunked.size]
                logits = runner.extend(self._tensor([ids]), chunked.slot, pad)
            chunked.done += len(tokens)
            chunked.slot += len(ids)
            self.stats.prefills += 1
            self.stats.prefill_tokens += len(tokens)
            self.stats.prefill_slots += len(ids)
            if chunked.done < len(prompt):
                ended = self._gpu_event()
                if started is not None and ended is not None:
                    chunked.earlier.append((started, ended))
                return
            chunked.started = started
            chunked.chosen, chunked.logprobs = self._choose(logits, [entry])
        shift = self._span_shift([entry])
        if shift is None:
            return
        self._chunked = None
        self._place([entry], [prompt], chunked.slot, chunked.chosen, chunked.logprobs, chunked.started, shift,
                    chunked.earlier)  # fmt: skip

    def _prefill_group(self, group: list[_Running], runner: EagerPrefill | CudaGraphPrefill, shift: int) -> None:
        pad_id = self.engine.pad_token_id
        prompts = [list(r.request.prompt_ids) for r in group]
        length = runner.length(max(len(p) for p in prompts), 0)
        rows = self._group_rows(len(group))
        pads = [length - len(p) for p in prompts] + [length - 1] * (rows - len(group))
        padded = [[pad_id] * (length - len(p)) + p for p in prompts] + [[pad_id] * length] * (rows - len(group))
        started = self._gpu_event()
        logits = runner(self._tensor(padded), self._tensor(pads))[: len(group)]
        self.stats.prefills += 1
        self.stats.prefill_tokens += sum(len(p) for p in prompts)
        self.stats.prefill_slots += rows * length
        chosen, logprobs = self._choose(logits, group)
        self._place(group, prompts, length, chosen, logprobs, started, shift)

    def _place(
        self,
        group: list[_Running],
        prompts: list[list[int]],
        length: int,
        chosen: torch.Tensor,
        logprobs: _Logprobs | None,
        started: torch.cuda.Event | None,
        shift: int,
        earlier: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None,
    ) -> None:
        """Give prefilled requests rows: shift the running rows by ``shift``, copy the keys and values of prompt
        ``j`` (prefill-cache row ``j``, the slots ending at ``length``) into a free row at the slots ending at the
        clock, and set their first tokens ``chosen`` (int64 ``[len(group)]`` on the device) on their way to the
        host (``started``, ``earlier``: timing events of the prefill's GPU work)."""
        if self.running:
            self._shift(shift)
        else:
            self._clock += shift
        # copy every prompt's keys and values into a free row, at the slots that end at the clock
        free = [index for index, row in enumerate(self._rows) if row is None]
        src_rows, src_slots, dst_rows, dst_slots = [], [], [], []
        for j, (entry, prompt) in enumerate(zip(group, prompts, strict=True)):
            row = free[j]
            entry.start = self._clock - len(prompt)
            entry.end = self._clock + entry.request.max_tokens - 1
            self._rows[row] = entry
            src_rows += [j] * len(prompt)
            src_slots += range(length - len(prompt), length)
            dst_rows += [row] * len(prompt)
            dst_slots += range(entry.start, self._clock)
        where_src = (self._tensor(src_rows), slice(None), self._tensor(src_slots))
        where_dst = (self._tensor(dst_rows), slice(None), self._tensor(dst_slots))
        cache, scratch = self.engine.cache, self._prefill_cache
        assert scratch is not None
        for main, side in ((cache.keys, scratch.keys), (cache.values, scratch.values)):
            for layer, source in zip(main, side, strict=True):
                layer[where_dst] = source[where_src]
        self._next[self._tensor(free[: len(group)])] = chosen
        for entry in group:
            entry.launched = 1
        first = self._to_host(group, chosen, logprobs, started, prefill=True)
        first.earlier = earlier or []
        if first.ready is None:  # off CUDA the work is done: hand the first tokens over now
            self._process(first)
        else:  # the host takes them next iteration, while the GPU runs the decode step launched after them
            self._pending.append(first)

    def _shift(self, shift: int) -> None:
        """Move every running row's slots (and the clock) by ``shift`` slots; positions do not change."""
        if not shift:
            return
        low = min(r.start for r in self._rows if r is not None)
        high = self._clock
        top = max(index for index, r in enumerate(self._rows) if r is not None) + 1
        cache = self.engine.cache
        for layer in (*cache.keys, *cache.values):
            layer[:top, :, low + shift : high + shift] = layer[:top, :, low:high].clone()
        for entry in self._rows:
            if entry is not None:
                entry.start += shift
                entry.end += shift
        self._clock += shift
        self.stats.shifts += 1

    # --- decoding ------------------------------------------------------------------------------------------------

    def _tensor(self, values: Any) -> torch.Tensor:
        """``values`` (a list of ints or floats) on the device, copied without waiting for the GPU: through pinned
        memory on CUDA (a plain copy from pageable memory would wait for the step in flight)."""
        host = torch.tensor(values)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _compact(self) -> None:
        """Move the highest running rows into free lower rows while that lets a smaller bucket run."""
        count = self.running
        bucket = next(b for b in self.buckets if b >= count)
        top = max(index for index, r in enumerate(self._rows) if r is not None) + 1
        if top <= bucket:
            return
        cache = self.engine.cache
        for hole in range(count):
            if self._rows[hole] is not None:
                continue
            source = max(index for index, r in enumerate(self._rows) if r is not None)
            entry = self._rows[source]
            assert entry is not None
            for layer in (*cache.keys, *cache.values):
                layer[hole, :, entry.start : self._clock] = layer[source, :, entry.start : self._clock]
            self._next[hole] = self._next[source]
            self._rows[hole], self._rows[source] = entry, None

    def _launch(self) -> None:
        """Launch one decode step over the rows that still decode (none: nothing): their next tokens are chosen on
        the device, written to the rows' next inputs, and start their copy to the host (:attr:`_pending`). Rows
        whose request has ended (or whose tokens are all asked for) ride along as padding."""
        if not any(r is not None and r.decoding for r in self._rows):
            return
        if self._clock >= self.max_seq_len:  # unreachable: admission keeps every row's span inside the cache
            raise RuntimeError(f"the decode clock reached the cache's end ({self.max_seq_len} slots)")
        self._compact()
        top = max(index for index, r in enumerate(self._rows) if r is not None) + 1
        batch = next(b for b in self.buckets if b >= top)
        rows = self._rows[:batch]
        live = [i for i, r in enumerate(rows) if r is not None and r.decoding]
        entries = [rows[i] for i in live]
        pads = [self._clock] * batch
        for i, entry in zip(live, entries, strict=True):
            pads[i] = entry.start
        step = self.engine._decode_step()
        started = self._gpu_event()
        logits = step(self._next[:batch], self._clock, self._tensor(pads))
        self._clock += 1
        self.stats.decode_steps += 1
        self.stats.decode_rows += batch
        self.stats.decode_tokens += len(live)
        argmax = step.last_argmax
        index = None
        if len(live) < batch:
            index = self._tensor(live)
            logits = logits[index]
            argmax = None if argmax is None else argmax[index]
        chosen, logprobs = self._choose(logits, entries, argmax=argmax)
        if index is None:
            self._next[:batch] = chosen
        else:
            self._next[index] = chosen
        for entry in entries:
            entry.launched += 1
        self._pending.append(self._to_host(entries, chosen, logprobs, started, prefill=False))

    def _gpu_event(self) -> torch.cuda.Event | None:
        """A timing event recorded on the current CUDA stream now (None off CUDA)."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _to_host(
        self,
        entries: list[_Running],
        chosen: torch.Tensor,
        logprobs: _Logprobs | None,
        started: torch.cuda.Event | None,
        prefill: bool,
    ) -> _Pending:
        """Start the copy of ``entries``' chosen tokens (and log-probabilities) to the host, behind the work that
        computes them (begun at ``started``): on CUDA into pinned memory, with an event the host waits on only when
        it reads them."""
        if self.device.type == "cuda":
            chosen = chosen.to("cpu", non_blocking=True)
            if logprobs is not None:
                logprobs = (logprobs[0], *(t.to("cpu", non_blocking=True) for t in logprobs[1:]))
        return _Pending(entries, chosen, logprobs, self._gpu_event(), started, prefill)

    def _process(self, pending: _Pending) -> None:
        """Give launched tokens to their requests (those that have not ended since)."""
        if pending.ready is not None:
            started = time.perf_counter()
            pending.ready.synchronize()
            self.stats.wait_seconds += time.perf_counter() - started
            if pending.started is not None:
                seconds = pending.started.elapsed_time(pending.ready) / 1e3
                if pending.prefill:
                    seconds += sum(start.elapsed_time(end) for start, end in pending.earlier) / 1e3
                    self.stats.prefill_gpu_seconds += seconds
                else:
                    self.stats.decode_gpu_seconds += seconds
        tokens = pending.tokens.tolist()
        logprobs = self._logprob_lists(pending.logprobs, tokens, len(tokens))
        keep = [i for i, entry in enumerate(pending.entries) if not entry.done]
        self._advance([pending.entries[i] for i in keep], [tokens[i] for i in keep], [logprobs[i] for i in keep])

    def _choose(
        self, logits: torch.Tensor, entries: list[_Running], argmax: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, _Logprobs | None]:
        """The next token of every entry from its logits row (``[n, V]``): int64 ``[n]`` on the device (no host
        synchronisation), and the log-probabilities of the entries that asked (see :data:`_Logprobs`).

        Greedy rows take the argmax (``argmax``: computed already, int64 ``[n]``); sampled rows divide by their
        temperature, keep their top-k / top-p tokens, and take ``argmax(p / E)`` with ``E ~ Exp(1)`` drawn from
        their own generator (or the shared one)."""
        tokens = argmax if argmax is not None else logits.float().argmax(dim=-1)
        sampled = [i for i, e in enumerate(entries) if not e.greedy]
        if sampled:
            tokens = tokens.clone()
            where = self._tensor(sampled)
            requests = [entries[i].request for i in sampled]
            scores = logits[where].float()
            temperature = self._tensor([r.temperature for r in requests])
            scores = scores / temperature[:, None]
            top_k = [r.top_k if r.top_k and r.top_k < scores.shape[1] else 0 for r in requests]
            if any(top_k):
                kept = torch.topk(scores, max(top_k), dim=-1).values
                index = self._tensor([max(k, 1) - 1 for k in top_k])[:, None]
                floor = kept.gather(1, index)
                floor = torch.where(self._tensor(top_k)[:, None] > 0, floor, -torch.inf)
                scores = scores.masked_fill(scores < floor, -torch.inf)
            top_p = [r.top_p if r.top_p is not None else 1.0 for r in requests]
            if any(p < 1.0 for p in top_p):
                ordered, order = scores.sort(dim=-1, descending=True)
                probs = torch.softmax(ordered, dim=-1)
                before = probs.cumsum(dim=-1) - probs  # the mass of the tokens ranked above each one
                drop = before >= self._tensor(top_p)[:, None]
                scores = scores.masked_fill(drop.scatter(1, order, drop), -torch.inf)
            probs = torch.softmax(scores, dim=-1)
            noise = torch.empty_like(probs)
            shared = [j for j, i in enumerate(sampled) if entries[i].generator is None]
            if shared:
                noise[shared] = torch.empty((len(shared), probs.shape[1]), device=self.device).exponential_(
                    generator=self._generator
                )
            for j, i in enumerate(sampled):
                if entries[i].generator is not None:
                    noise[j].exponential_(generator=entries[i].generator)
            tokens[where] = (probs / noise).argmax(dim=-1)
        wanted = [i for i, e in enumerate(entries) if e.request.logprobs is not None]
        if not wanted:
            return tokens, None
        where = self._tensor(wanted)
        table = torch.log_softmax(logits[where].float(), dim=-1)
        picked = table.gather(1, tokens[where][:, None])[:, 0]
        widths = [entries[i].request.logprobs or 0 for i in wanted]
        values, ids = table.topk(max(widths), dim=-1)
        return tokens, ([*zip(wanted, widths, strict=True)], picked, values, ids)

    @staticmethod
    def _logprob_lists(logprobs: _Logprobs | None, tokens: list[int], count: int) -> list[TokenLogprob | None]:
        """Per entry, its :class:`TokenLogprob` (None where not asked for), from :meth:`_choose`'s device tensors."""
        out: list[TokenLogprob | None] = [None] * count
        if logprobs is None:
            return out
        wanted, picked, values, ids = logprobs
        picked_list, value_lists, id_lists = picked.tolist(), values.tolist(), ids.tolist()
        for j, (i, width) in enumerate(wanted):
            top = list(zip(id_lists[j][:width], value_lists[j][:width], strict=True))
            out[i] = TokenLogprob(tokens[i], picked_list[j], top)
        return out

    def _advance(self, entries: list[_Running], tokens: list[int], logprobs: list[TokenLogprob | None]) -> None:
        """Give each entry its new token: emit it, and free the row of an entry that has ended."""
        for entry, token, logprob in zip(entries, tokens, logprobs, strict=True):
            request = entry.request
            entry.generated += 1
            reason = None
            event = Event(entry.id, logprobs=None if logprob is None else [logprob])
            if token in self.eos and not request.ignore_eos:
                reason = "eos"
                event.token_ids = [token]
            elif entry.text is not None:
                entry.text.add(token)
                if entry.text.stopped:
                    reason = "stop"
                event.token_ids = [token]
            else:
                event.token_ids = [token]
            if reason is None and entry.generated >= request.max_tokens:
                reason = "length"
            if entry.text is not None:
                if reason is not None:
                    entry.text.flush()
                event.text = entry.text.take_delta(final=reason is not None)
            event.finish_reason = reason
            self._emit(entry, event)
            if reason is not None:
                for index, row in enumerate(self._rows):
                    if row is entry:
                        self._rows[index] = None
