"""The generation engine: a model and its tokenizer, a static KV cache, a graphed decode step, and ``generate``.

:func:`load` reads any checkpoint bittern reads (packed in either scale convention, bf16, prequantized, the
Falcon-E and 2B4T layouts, plain full-precision) and builds an :class:`Engine` around it. Every linear layer
runs as its own module (:class:`~bittern.nn.TernaryLinear` by default: int8 activations x ternary weights through
:mod:`bittern.kernels`), so the engine computes what the model computes.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from bittern import devices
from bittern.engine.decoder import Decoder, StaticKVCache
from bittern.engine.graphs import CudaGraphDecodeStep, EagerDecodeStep
from bittern.engine.prefill import CudaGraphPrefill, EagerPrefill
from bittern.engine.sampling import Sampler, SamplingParams
from bittern.engine.text import RowText
from bittern.errors import CheckpointError, ConfigError, MissingFileError

StreamCallback = Callable[[int, str], None]
"""Receives ``(row, text)``: the next piece of row ``row``'s generated text."""
Weights = Literal["ternary", "dense"]

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_SEQ_LEN = 2048
FINISH_CHECK_EVERY = 16
"""Without streaming or stop strings, the host checks every this many tokens whether all rows have ended."""


@dataclass
class GenerationResult:
    """What :meth:`Engine.generate` produced.

    Attributes:
        texts: the generated text of each row (the prompt not included; cut before a stop string; no EOS).
        token_ids: the generated token ids of each row (an EOS that ended it included; nothing after a stop).
        prompt_token_ids: the prompt's token ids of each row.
        finish_reasons: per row ``"eos"``, ``"stop"`` (a stop string) or ``"length"`` (``max_new_tokens``).
        prefill_seconds: wall time of the prompt forward passes and the first tokens.
        decode_seconds: wall time of the decode steps (every token after the first).
        decode_tokens: tokens produced by decode steps, summed over rows.
    """

    texts: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    prompt_token_ids: list[list[int]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_tokens: int = 0

    @property
    def text(self) -> str:
        """The first row's text (the one row of a single prompt)."""
        return self.texts[0]

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens processed, summed over rows (padding not counted)."""
        return sum(len(ids) for ids in self.prompt_token_ids)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        """Decoded tokens per second, summed over the rows of the batch."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def extend(self, other: GenerationResult) -> None:
        """Append the rows and add the timings of ``other`` (a later chunk of the same request)."""
        self.texts += other.texts
        self.token_ids += other.token_ids
        self.prompt_token_ids += other.prompt_token_ids
        self.finish_reasons += other.finish_reasons
        self.prefill_seconds += other.prefill_seconds
        self.decode_seconds += other.decode_seconds
        self.decode_tokens += other.decode_tokens


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``dtype`` (a torch dtype or its name); None: bfloat16 on a GPU, float32 on the CPU."""
    return devices.resolve_dtype(dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights share one)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _load_tokenizer(path: Path) -> Any | None:
    """The tokenizer saved beside a checkpoint (or stored in a GGUF file), or None when there is none."""
    from bittern.tokenization import has_tokenizer, load_tokenizer

    return load_tokenizer(path, "the engine") if has_tokenizer(path) else None


def _token_ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value] if value is not None else []


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a block: its passes over every live object (a loaded model and the
    libraries hold hundreds of thousands) start every few hundred allocations, and an eager decode step allocates
    dozens of tensors. A step's garbage is freed by reference counting."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


HUGE_PAGE_MIN_BYTES = 1 << 16
"""CPU weights at least this large are moved onto huge pages by :func:`weights_on_huge_pages`."""


def weights_on_huge_pages(model: nn.Module, least: int = HUGE_PAGE_MIN_BYTES) -> int:
    """Move a CPU model's large weights — packed ternary weights, embeddings, dense layers, each at least ``least``
    bytes, not on huge pages yet (a checkpoint read from disk is read onto them) — into one block of transparent
    huge pages (:func:`bittern.kernels.cpu.huge_page_block`), in place: the same modules, tensors of the same values
    (parameters keep their identity, so tied weights stay tied). One at a time, each original freed as its copy
    takes its place. Returns the bytes moved (0 where huge pages are not available or turned off with
    ``BITTERN_HUGE_PAGES=0``)."""
    from bittern.kernels import cpu

    if not cpu.huge_pages_available():
        return 0
    slots: dict[int, tuple[nn.Module, str, bool]] = {}  # by tensor identity: where it lives, parameter or buffer
    for module in model.modules():
        for table, is_parameter in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in table.items():
                big = tensor is not None and tensor.device.type == "cpu" and tensor.is_contiguous()
                big = big and tensor.numel() * tensor.element_size() >= least and not cpu.on_huge_pages(tensor)
                if big and id(tensor) not in slots:
                    slots[id(tensor)] = (module, name, is_parameter)
    if not slots:
        return 0
    sizes = []
    for module, name, is_parameter in slots.values():
        tensor = (module._parameters if is_parameter else module._buffers)[name]
        sizes.append(-(-tensor.numel() * tensor.element_size() // 64) * 64)
    block = cpu.huge_page_block(sum(sizes))
    offset = 0
    with torch.no_grad():
        for (module, name, is_parameter), size in zip(slots.values(), sizes, strict=True):
            table = module._parameters if is_parameter else module._buffers
            tensor = table[name]
            nbytes = tensor.numel() * tensor.element_size()
            copy = block[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
            copy.copy_(tensor)
            if is_parameter:
                tensor.data = copy  # the same Parameter object: modules sharing it stay tied
            else:
                for other in model.modules():  # a buffer registered under several modules moves in each
                    for key, value in other._buffers.items():
                        if value is tensor:
                            other._buffers[key] = copy
            del tensor, copy
            offset += size
    return offset


def _inference(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(), _collector_paused():
            return method(*args, **kwargs)

    return wrapper


class Engine:
    """Text generation with a Hugging Face causal LM whose linear layers may be ternary.

    Args:
        model: a ``LlamaForCausalLM`` / ``BitNetForCausalLM`` (or Mistral / Qwen2 / Qwen3) model on its device
            and dtype, with :class:`~bittern.nn.TernaryLinear`, :class:`~bittern.nn.BitLinear` or ``nn.Linear``
            layers; it is put in eval mode.
        tokenizer: its Hugging Face tokenizer (needed for text in and out; token ids work without one).
        max_batch: the most rows decoded together (larger requests run in chunks); sizes the KV cache.
        max_seq_len: the longest prompt + generation; default ``min(max_position_embeddings, 2048)``.
        cuda_graph: on a CUDA device, capture the decode step in a CUDA graph per batch size, and the prompt's
            forward per batch size and length bucket (:mod:`bittern.engine.prefill`; False: both eager, for
            debugging and comparison). Ignored on the CPU.
        compile: with ``cuda_graph``, compile the decode step with ``torch.compile`` before capturing it (fuses
            the step's elementwise work; the first decode of a batch size then takes tens of seconds longer).
        source: the checkpoint directory the model came from (named in errors).

    On the CPU the model's large weights are moved onto transparent huge pages first (:func:`weights_on_huge_pages`:
    the same values and parameters; ``BITTERN_HUGE_PAGES=0`` leaves them).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any | None = None,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_seq_len: int | None = None,
        cuda_graph: bool = True,
        compile: bool = True,
        source: str | Path | None = None,
    ) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive integer, not {max_batch!r}")
        config = model.config
        limit = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_SEQ_LEN
        if max_seq_len is None:
            max_seq_len = min(limit, DEFAULT_MAX_SEQ_LEN)
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ConfigError(f"max_seq_len must be an integer >= 2, not {max_seq_len!r}")
        # no conversion step: the inference kernels read TernaryLinear's packed Hugging Face layout in place
        self.model = model.eval()
        if next(model.parameters()).device.type == "cpu":
            weights_on_huge_pages(self.model)  # the weights are streamed from memory once per token
        self.tokenizer = tokenizer
        self.source = Path(source) if source is not None else None
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.decoder = Decoder(self.model, max_seq_len)
        self.device = self.decoder.device
        self.dtype = self.decoder.dtype
        self.cuda_graph = bool(cuda_graph) and self.device.type == "cuda"
        self.compile = bool(compile)
        generation_config = getattr(model, "generation_config", None)
        eos = _token_ids(getattr(generation_config, "eos_token_id", None) or getattr(config, "eos_token_id", None))
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos += _token_ids(tokenizer.eos_token_id)
        self.eos_token_ids = sorted(set(eos))
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad is None:
            pad = getattr(config, "pad_token_id", None)
        if pad is None:
            pad = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.pad_token_id = int(pad)
        self._cache: StaticKVCache | None = None
        self._step: EagerDecodeStep | CudaGraphDecodeStep | None = None
        self._prefill: EagerPrefill | CudaGraphPrefill | None = None

    # --- state ----------------------------------------------------------------------------------------

    @property
    def cache(self) -> StaticKVCache:
        """The static KV cache (allocated on first use: ``max_batch`` rows of ``max_seq_len`` tokens)."""
        if self._cache is None:
            self._cache = self.decoder.new_cache(self.max_batch)
        return self._cache

    def _prefill_runner(self) -> EagerPrefill | CudaGraphPrefill:
        if self._prefill is None:
            runner = CudaGraphPrefill if self.cuda_graph else EagerPrefill
            self._prefill = runner(self.decoder, self.cache)
        return self._prefill

    def _decode_step(self) -> EagerDecodeStep | CudaGraphDecodeStep:
        if self._step is None:
            if self.cuda_graph:
                self._step = CudaGraphDecodeStep(self.decoder, self.cache, compile=self.compile)
            else:
                self._step = EagerDecodeStep(self.decoder, self.cache)
        return self._step

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's parameters and buffers (the KV cache not included)."""
        return weight_bytes(self.model)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _require_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            where = f" in '{self.source}'" if self.source is not None else ""
            raise MissingFileError(f"{what} needs a tokenizer, and there are no tokenizer files{where}")
        return self.tokenizer

    # --- teacher-forced logits ---------------------------------------------------------------------------

    @_inference
    def logits(self, input_ids: torch.Tensor | Sequence[Sequence[int]], attention_mask: Any = None) -> torch.Tensor:
        """Teacher-forced logits through the engine's own forward (prefill path).

        Args:
            input_ids: int ``[B, T]``, ``T <= max_seq_len`` (batches beyond ``max_batch`` run in chunks).
            attention_mask: optional ``[B, T]`` of 0/1 with left padding only (0s before the 1s of each row).

        Returns:
            ``[B, T, V]`` logits in the model's dtype, on the engine's device (padding positions hold
            meaningless values).
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long).to(self.device)
        if ids.dim() != 2 or ids.shape[1] < 1:
            raise ConfigError(f"input_ids must be [batch, length] with length >= 1, not {list(ids.shape)}")
        batch, length = ids.shape
        if length > self.max_seq_len:
            raise ConfigError(f"input_ids hold {length} tokens, more than max_seq_len ({self.max_seq_len})")
        if attention_mask is None:
            pad = torch.zeros(batch, dtype=torch.long, device=self.device)
        else:
            mask = torch.as_tensor(attention_mask).to(self.device).long()
            if mask.shape != ids.shape:
                raise ConfigError(f"attention_mask {list(mask.shape)} must match input_ids {list(ids.shape)}")
            pad = length - mask.sum(dim=1)
            expected = (self.decoder.slots[:length][None] >= pad[:, None]).long()
            if not torch.equal(mask, expected):
                raise ConfigError("attention_mask must be left padding: 0s before the 1s of each row, nothing else")
        slots = self.decoder.slots[:length]
        out = []
        for start in range(0, batch, self.max_batch):
            chunk = slice(start, start + self.max_batch)
            out.append(self.decoder.forward(ids[chunk], slots, pad[chunk], self.cache, length))
        return torch.cat(out)

    # --- generation ---------------------------------------------------------------------------------------

    def encode(self, prompts: str | Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt, with the tokenizer's special tokens (BOS, if it adds one)."""
        tokenizer = self._require_tokenizer("text generation")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [list(tokenizer(text, add_special_tokens=True)["input_ids"]) for text in texts]

    def generate(
        self,
        prompts: str | Sequence[str],
        max_new_tokens: int = 128,
        *,
        temperature: float | None = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        stream: bool | StreamCallback | None = None,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        """Continue each prompt.

        Prompts of different lengths are decoded together (left padding, per-row positions and attention mask);
        a row that has ended emits nothing more. See :meth:`generate_ids` for the arguments.
        """
        return self.generate_ids(
            self.encode(prompts),
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            stop=stop,
            seed=seed,
            stream=stream,
            ignore_eos=ignore_eos,
        )

    @_inference
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]] | torch.Tensor,
        max_new_tokens: int = 128,
        *,
        temperature: float | None = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        stream: bool | StreamCallback | None = None,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        """Continue prompts given as token ids.

        Args:
            prompts: one list of token ids per row (or an int ``[B, T]`` tensor), each non-empty.
            max_new_tokens: the most tokens generated per row.
            temperature, top_k, top_p, repetition_penalty, seed: see :class:`SamplingParams` (temperature 0:
                greedy).
            stop: stop strings: a row ends when its decoded text contains one; its text ends just before it.
            stream: True prints the text of a single prompt to stdout as it is generated; a callable receives
                ``(row, text)`` pieces of every row; concatenated, a row's pieces equal its final text.
            ignore_eos: keep generating after an end-of-sequence token (benchmarks).

        Returns:
            a :class:`GenerationResult` with the texts (when there is a tokenizer), token ids and timings.
        """
        rows = [[int(t) for t in row] for row in (prompts.tolist() if isinstance(prompts, torch.Tensor) else prompts)]
        self.check_request(rows, max_new_tokens)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if stops or stream:
            self._require_tokenizer("stop strings and streaming")
        callback: StreamCallback | None
        if stream is True:
            if len(rows) != 1:
                raise ConfigError(f"stream=True prints one prompt's text; got {len(rows)} prompts (pass a callback)")
            callback = _print_to_stdout
        else:
            callback = stream or None
        sampler = Sampler(params, self.device)
        result = GenerationResult()
        for start in range(0, len(rows), self.max_batch):
            chunk = rows[start : start + self.max_batch]
            row_callback = None if callback is None else _offset(callback, start)
            result.extend(self._generate_chunk(chunk, max_new_tokens, sampler, stops, row_callback, ignore_eos))
        return result

    def check_request(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """Raise :class:`ConfigError` unless every prompt is a non-empty list of ids in the vocabulary and fits
        ``max_seq_len`` with ``max_new_tokens`` (a positive integer) after it: what :meth:`generate_ids` checks
        before any work, callable before printing anything."""
        if not prompts:
            raise ConfigError("no prompts given")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
        vocab = self.decoder.embed.num_embeddings
        for index, row in enumerate(prompts):
            if not row:
                raise ConfigError(f"prompt {index} has no tokens")
            if min(row) < 0 or max(row) >= vocab:
                raise ConfigError(f"prompt {index} holds token ids outside the vocabulary [0, {vocab})")
            if len(row) + max_new_tokens > self.max_seq_len:
                raise ConfigError(
                    f"prompt {index} ({len(row)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
                    f"({self.max_seq_len}); shorten the prompt or lower max_new_tokens"
                )

    def _generate_chunk(
        self,
        rows: list[list[int]],
        max_new_tokens: int,
        sampler: Sampler,
        stops: list[str],
        callback: StreamCallback | None,
        ignore_eos: bool,
    ) -> GenerationResult:
        batch, longest = len(rows), max(len(row) for row in rows)
        if longest + max_new_tokens > self.max_seq_len:
            raise ConfigError(
                f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                f"max_seq_len ({self.max_seq_len})"
            )
        prefill = self._prefill_runner()
        prompt_len = prefill.length(longest, max_new_tokens)  # slots of the prompts: a graph's bucket, left-padded
        total = prompt_len + max_new_tokens
        device = self.device
        pads = [prompt_len - len(row) for row in rows]
        padded = torch.tensor([[self.pad_token_id] * p + row for p, row in zip(pads, rows, strict=True)])
        input_ids = padded.to(device)
        pad = torch.tensor(pads, dtype=torch.long, device=device)
        history = None
        if sampler.params.uses_history:  # padding replaced by a token the row already has: it adds no penalty
            history = torch.empty((batch, total), dtype=torch.long, device=device)
            history[:, :prompt_len] = torch.tensor([[row[0]] * p + row for p, row in zip(pads, rows, strict=True)])
        eos = None
        if self.eos_token_ids and not ignore_eos:
            eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=device)
        host_side = bool(stops) or callback is not None
        texts = [RowText(self.tokenizer, stops) for _ in rows] if host_side else []
        ended = [False] * batch  # host side: a row that has ended gets no more text
        generated = torch.empty((batch, max_new_tokens), dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        step = self._decode_step()

        self._sync()
        started = time.perf_counter()
        logits = prefill(input_ids, pad)
        token = sampler(logits, None if history is None else history[:, :prompt_len])
        self._sync()
        prefilled = time.perf_counter()
        for index in range(max_new_tokens):
            token = token.masked_fill(finished, self.pad_token_id)
            generated[:, index] = token
            if history is not None:
                history[:, prompt_len + index] = token
            if eos is not None:
                finished |= torch.isin(token, eos)
            if host_side:
                self._advance_texts(token.tolist(), finished.tolist(), texts, ended, callback)
                if any(text.stopped for text in texts):
                    finished |= torch.tensor([t.stopped for t in texts], device=device)
                if all(ended):
                    break
            elif eos is not None and (index + 1) % FINISH_CHECK_EVERY == 0 and bool(finished.all()):
                break
            if index + 1 == max_new_tokens:
                break
            logits = step(token, prompt_len + index, pad)
            if sampler.plain_greedy and step.last_argmax is not None:  # computed inside the step's graph
                token = step.last_argmax
            else:
                token = sampler(logits, None if history is None else history[:, : prompt_len + index + 1])
        self._sync()
        decoded = time.perf_counter()
        steps_done = index + 1
        return self._finish(rows, generated[:, :steps_done].tolist(), texts, eos is not None, callback, ended,
                            prefilled - started, decoded - prefilled)  # fmt: skip

    def _advance_texts(
        self,
        tokens: list[int],
        finished: list[bool],
        texts: list[RowText],
        ended: list[bool],
        callback: StreamCallback | None,
    ) -> None:
        eos = set(self.eos_token_ids)
        for row, (token, done) in enumerate(zip(tokens, finished, strict=True)):
            if ended[row]:
                continue
            if not (done and token in eos):
                texts[row].add(token)
            ended[row] = done or texts[row].stopped
            if callback is not None:
                delta = texts[row].take_delta(final=ended[row])
                if delta:
                    callback(row, delta)

    def _finish(
        self,
        rows: list[list[int]],
        generated: list[list[int]],
        texts: list[RowText],
        stops_at_eos: bool,
        callback: StreamCallback | None,
        ended: list[bool],
        prefill_seconds: float,
        decode_seconds: float,
    ) -> GenerationResult:
        eos = set(self.eos_token_ids) if stops_at_eos else set()
        result = GenerationResult(prompt_token_ids=rows, prefill_seconds=prefill_seconds, decode_seconds=decode_seconds)
        for row, ids in enumerate(generated):
            reason = "length"
            end = next((i for i, t in enumerate(ids) if t in eos), None)
            if texts and texts[row].stopped:
                ids, reason = ids[: len(texts[row].ids)], "stop"
            elif end is not None:
                ids, reason = ids[: end + 1], "eos"
            if texts:
                if callback is not None and not ended[row]:
                    delta = texts[row].take_delta(final=True)
                    if delta:
                        callback(row, delta)
                text = texts[row].text
            elif self.tokenizer is not None:
                body = ids[:-1] if reason == "eos" else ids
                text = self.tokenizer.decode(body, skip_special_tokens=True)
            else:
                text = ""
            result.texts.append(text)
            result.token_ids.append(ids)
            result.finish_reasons.append(reason)
            result.decode_tokens += max(len(ids) - 1, 0)
        return result

    # --- chat -----------------------------------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of ``messages`` through the tokenizer's chat template, with the generation prompt.

        Raises:
            ConfigError: the tokenizer has no chat template, or a message is not ``{"role": ..., "content": ...}``.
        """
        tokenizer = self._require_tokenizer("chat")
        self.check_chat_template()
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping) or not {"role", "content"} <= set(message):
                raise ConfigError(f"message {index} must be a mapping with 'role' and 'content', not {message!r}")
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_chat_template(self) -> None:
        """Raise :class:`ConfigError` when the tokenizer has no chat template."""
        tokenizer = self._require_tokenizer("chat")
        if not getattr(tokenizer, "chat_template", None):
            where = f"of '{self.source}' " if self.source is not None else ""
            raise ConfigError(
                f"the tokenizer {where}has no chat template (no chat_template in tokenizer_config.json or "
                "chat_template.jinja; a tokenizer bittern trained on plain text has none): give one with "
                "--chat-template plain (or chatml, or a Jinja file), or store one in the model with bittern convert "
                "--chat-template / bittern train --chat-template (from Python: bittern.tokenization.set_chat_template)"
            )

    def chat(
        self, messages: Sequence[Mapping[str, str]], max_new_tokens: int = 256, **options: Any
    ) -> GenerationResult:
        """The assistant's reply to ``messages`` (``[{"role": "user", "content": ...}, ...]``), through the
        tokenizer's chat template; ``options`` as for :meth:`generate_ids`."""
        return self.generate_ids([self.chat_prompt(messages)], max_new_tokens, **options)


def _print_to_stdout(row: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _offset(callback: StreamCallback, start: int) -> StreamCallback:
    return lambda row, text: callback(start + row, text)


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    weights: Weights = "ternary",
    max_batch: int = DEFAULT_MAX_BATCH,
    max_seq_len: int | None = None,
    cuda_graph: bool = True,
    compile: bool = True,
    adapter: str | Path | None = None,
    chat_template: str | None = None,
) -> Engine:
    """An :class:`Engine` for the checkpoint at ``path`` and the tokenizer saved beside it (or inside it).

    Args:
        path: any checkpoint :func:`bittern.load_model` reads: bittern's packed (either scale convention), bf16
            and prequantized variants, Falcon-E and 2B4T style packed checkpoints, plain full-precision ones, and
            ``llama`` / ``bitnet`` GGUF files (whose tokenizer is read from the file).
        device: default ``cuda`` when available, else ``cpu``.
        dtype: of the dense weights and activations; default bfloat16 on a GPU, float32 on the CPU.
        weights: ``ternary``: every ternary layer (and, for a plain checkpoint, every decoder linear) as a packed
            :class:`~bittern.nn.TernaryLinear` (int8 activations); ``dense``: the same layers as ``nn.Linear``
            holding ``Wt / s_w`` in ``dtype`` (the bf16 variant's numbers, no activation quantization).
        max_batch, max_seq_len, cuda_graph, compile: see :class:`Engine`.
        adapter: a PEFT LoRA adapter directory (``bittern train --lora-rank``'s ``adapter/``) to run on the model
            as base + adapter, unmerged (:func:`bittern.peft.load_adapter`).
        chat_template: a chat template for :meth:`Engine.chat` that replaces the tokenizer's: a name of
            :data:`bittern.tokenization.CHAT_TEMPLATES` or a Jinja file.
    """
    from bittern.checkpoint import load_model

    if weights not in ("ternary", "dense"):
        raise ConfigError(f"weights must be 'ternary' or 'dense', not {weights!r}")
    torch_device = devices.resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    directory = Path(path)
    tokenizer = _load_tokenizer(directory)
    if chat_template is not None:
        from bittern.tokenization import set_chat_template

        if tokenizer is None:
            raise MissingFileError("--chat-template needs the model's tokenizer, and there are none", directory)
        set_chat_template(tokenizer, chat_template)
    model = load_model(
        directory, layers="ternary" if weights == "ternary" else "linear", dtype=torch_dtype, device=torch_device
    )
    if adapter is not None:
        model = attach_adapter(model, adapter)
    return Engine(
        model,
        tokenizer,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        cuda_graph=cuda_graph,
        compile=compile,
        source=directory,
    )


def attach_adapter(model: nn.Module, adapter: str | Path) -> nn.Module:
    """``model`` with the PEFT LoRA adapter in directory ``adapter`` attached, unmerged: the Hugging Face model
    whose adapted linear layers compute base + ``scaling · B(A(x))`` (PEFT's ``get_base_model()``).

    Raises:
        MissingFileError: ``adapter`` is not an adapter directory.
        CheckpointError: the adapter does not fit the model (another base's shapes or layer names).
    """
    try:
        from bittern.peft import load_adapter
    except ImportError as exc:  # pragma: no cover - peft is a dev dependency
        raise ConfigError("--adapter needs PEFT: pip install 'bittern[peft]'") from exc
    try:
        with warnings.catch_warnings():  # raised inside transformers when PEFT wraps a model, not bittern's concern
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            peft_model = load_adapter(model, adapter)
    except (RuntimeError, ValueError, KeyError) as exc:
        reason = " ".join(str(exc).split())[:400]
        raise CheckpointError(f"the LoRA adapter does not fit this model ({reason})", adapter) from exc
    return peft_model.get_base_model().eval()
