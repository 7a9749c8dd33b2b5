"""Perplexity of a causal language model over a text, with strided (sliding-window) evaluation.

Windowing (the Hugging Face strided evaluation, with every token scored):

* a *window* is one forward pass over ``window`` consecutive tokens; window ``k`` feeds tokens
  ``[k * stride, k * stride + window)`` and its logits predict tokens ``k * stride + 1 … k * stride + window``;
* each window scores only the predictions no earlier window has made: the first window scores all of them
  (tokens ``1 … window``; token 0 has no context and is never scored), every later window scores the
  last ``stride`` of its predictions, each with at least ``window - stride + 1`` tokens of context;
* the last window is cut at the end of the text; every token at positions ``1 … T-1`` is scored exactly once.

``stride == window`` gives disjoint windows (fastest; the first token of each window is predicted from one
token of context, and the context restarts at each window); a smaller ``stride`` gives every scored token
more context (a better, lower estimate on a real model) for ``window / stride`` times the compute. The one
difference from the loop in the Hugging Face perplexity guide is that a window's last logit is used too, so
``stride == window`` drops no tokens (the guide's loop skips the first token of every window then).

Units: negative log-likelihoods in nats; perplexity ``= exp(mean NLL)``.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bittern import devices
from bittern.errors import ConfigError
from bittern.records import jsonl_records

DEFAULT_WINDOW_CAP = 1024
"""``evaluate_file`` uses ``min(config.max_position_embeddings, DEFAULT_WINDOW_CAP)`` when no window is given."""
PROGRESS_MIN_WINDOWS = 8
"""A progress bar is shown when there are more windows than this."""
_TEXT_FIELD = "text"


@dataclass(frozen=True)
class PerplexityResult:
    """Summed negative log-likelihood of the scored tokens.

    Attributes:
        nll_sum: sum over the scored tokens of ``-log p(token | context)``, in nats (float64 on the host).
        tokens: number of scored tokens (``T - 1`` for ``T`` input tokens).
        window: tokens per forward pass, as requested.
        stride: tokens between the starts of consecutive windows.
    """

    nll_sum: float
    tokens: int
    window: int
    stride: int

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per scored token, in nats/token."""
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        """``exp(mean_nll)`` (``inf`` if that overflows a float)."""
        mean = self.mean_nll
        return math.exp(mean) if mean < 709.0 else math.inf

    def as_dict(self) -> dict[str, Any]:
        """The fields plus ``mean_nll`` and ``perplexity``."""
        return {**asdict(self), "mean_nll": self.mean_nll, "perplexity": self.perplexity}


@dataclass(frozen=True)
class _Window:
    begin: int  # first input token
    end: int  # one past the last input token; the window predicts tokens begin+1 … end
    first_scored: int  # index into the window's predictions (0 … end-begin-1) of the first scored one


def _windows(length: int, window: int, stride: int) -> list[_Window]:
    """The windows over ``length`` tokens (see the module docstring)."""
    last_input = length - 1  # the final token is only ever a target
    windows: list[_Window] = []
    scored_until = 0  # every token at positions 1 … scored_until has been scored
    begin = 0
    while scored_until < last_input:
        end = min(begin + window, last_input)
        windows.append(_Window(begin, end, scored_until - begin))
        scored_until = end
        begin += stride
    return windows


def max_positions(model: nn.Module) -> int | None:
    """``model.config.max_position_embeddings`` (or ``n_positions``), if the config has one."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_window(model: nn.Module, cap: int = DEFAULT_WINDOW_CAP) -> int:
    """``min(max positions of the model, cap)``; ``cap`` if the config names no maximum."""
    limit = max_positions(model)
    return min(limit, cap) if limit is not None else cap


def _check_int(name: str, value: object, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{name} must be an integer, not {value!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {value}")
    return value


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def sliding_window_nll(
    model: nn.Module,
    token_ids: torch.Tensor,
    window: int,
    stride: int,
    batch_size: int = 8,
    *,
    progress: bool | None = None,
) -> PerplexityResult:
    """Sum the next-token negative log-likelihood of ``token_ids`` with strided windows.

    Window ``k`` feeds tokens ``[k*stride, k*stride + window)`` and scores only the predictions that no
    earlier window made, so every token at positions ``1 … T-1`` is scored exactly once, with at least
    ``window - stride + 1`` tokens of context after the first window (see :mod:`bittern.eval.perplexity`).
    Full-length windows run ``batch_size`` at a time; the last, shorter one runs alone. The model runs in
    eval mode under ``torch.inference_mode`` on its own device (its training flag is restored afterwards);
    logits are cast to float32 before the log-softmax, whatever the model's dtype.

    Args:
        model: a Hugging Face causal LM (``model(input_ids).logits`` is ``[B, L, V]``).
        token_ids: integer ``[T]`` token ids, ``T >= 2``; moved to the model's device.
        window: tokens per forward pass, ``>= 2`` and at most ``config.max_position_embeddings``.
        stride: tokens between window starts, ``1 <= stride <= window``.
        batch_size: windows per forward pass, ``>= 1``.
        progress: show a tqdm bar over windows (on stderr); default: when there are more than
            :data:`PROGRESS_MIN_WINDOWS` windows.

    Returns:
        the summed NLL (nats) over ``T - 1`` scored tokens.

    Raises:
        ConfigError: a bad ``window``, ``stride``, ``batch_size`` or ``token_ids`` (the message names it).
    """
    window = _check_int("window", window, 2)
    stride = _check_int("stride", stride, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    if stride > window:
        raise ConfigError(f"stride ({stride}) must not exceed window ({window})")
    limit = max_positions(model)
    if limit is not None and window > limit:
        raise ConfigError(f"window ({window}) exceeds the model's max_position_embeddings ({limit})")
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1:
        shape = list(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise ConfigError(f"token_ids must be a 1-D tensor of token ids, not {shape}")
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
        raise ConfigError(f"token_ids must hold integers, not {token_ids.dtype}")
    length = token_ids.numel()
    if length < 2:
        raise ConfigError(f"token_ids must hold at least 2 tokens (one to predict from, one to score), not {length}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    low, high = int(token_ids.min()), int(token_ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ConfigError(f"token_ids must lie in [0, {vocab}) (the model's vocabulary), found {low} … {high}")

    device = _model_device(model)
    ids = token_ids.to(device=device, dtype=torch.long)
    windows = _windows(length, window, stride)
    batches: list[list[_Window]] = []
    for item in windows:
        last = batches[-1] if batches else None
        if last is not None and len(last) < batch_size and last[0].end - last[0].begin == item.end - item.begin:
            last.append(item)
        else:
            batches.append([item])
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    show = len(windows) > PROGRESS_MIN_WINDOWS if progress is None else progress
    bar = _progress_bar(len(windows), show)
    nll_sum = 0.0
    scored = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                span = batch[0].end - batch[0].begin
                inputs = torch.stack([ids[w.begin : w.end] for w in batch])  # [B, L]
                targets = torch.stack([ids[w.begin + 1 : w.end + 1] for w in batch])  # [B, L]
                skip = min(w.first_scored for w in batch)  # predictions before this are scored by nobody
                kwargs: dict[str, Any] = {"use_cache": False}
                if keeps_logits:
                    kwargs["logits_to_keep"] = span - skip
                logits = model(input_ids=inputs, **kwargs).logits  # [B, L or L - skip, V], model dtype
                logits = logits[:, logits.shape[1] - (span - skip) :]
                batch_sum = torch.zeros((), dtype=torch.float32, device=device)
                for row, item in enumerate(batch):
                    start = item.first_scored - skip
                    row_logits = logits[row, start:].float()  # [n, V] float32
                    row_targets = targets[row, item.first_scored :]  # [n]
                    batch_sum += nn.functional.cross_entropy(row_logits, row_targets, reduction="sum")
                    scored += row_targets.numel()
                nll_sum += float(batch_sum.item())
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    assert scored == length - 1, (scored, length)
    return PerplexityResult(nll_sum=nll_sum, tokens=scored, window=window, stride=stride)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, show: bool) -> Any:
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="perplexity", unit="window", leave=False)


def read_text(data_path: str | Path) -> str:
    """The text of a data file, read as UTF-8.

    ``.jsonl``: one JSON object per line, its ``"text"`` field; documents are joined with a blank line
    (``"\\n\\n"``) and blank lines are skipped. Any other suffix (``.txt``, ``.md``, ``.rst``, ...) is read as text.

    Raises:
        ConfigError: the file is missing, not UTF-8, empty, or a JSONL line is not an object with a string
            ``"text"`` field (the message names the file and the line).
    """
    path = Path(data_path)
    if not path.is_file():
        raise ConfigError(f"data file '{path}' does not exist or is not a file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"data file '{path}' is not UTF-8 text ({exc})") from exc
    if path.suffix.lower() != ".jsonl":
        text = raw
    else:
        documents = []
        for where, record in jsonl_records(path):
            if not isinstance(record, dict) or _TEXT_FIELD not in record:
                raise ConfigError(f'data file {where}: no "{_TEXT_FIELD}" field')
            if not isinstance(record[_TEXT_FIELD], str):
                kind = type(record[_TEXT_FIELD]).__name__
                raise ConfigError(f'data file {where}: "{_TEXT_FIELD}" is a {kind}, not a string')
            documents.append(record[_TEXT_FIELD])
        text = "\n\n".join(documents)
    if not text.strip():
        raise ConfigError(f"data file '{path}' holds no text")
    return text


def load_tokenizer(model_path: str | Path) -> Any:
    """The tokenizer of the checkpoint at ``model_path`` (its directory's files, or the one a GGUF file stores),
    with a clear error when there is none.

    Raises:
        MissingFileError: ``model_path`` holds no tokenizer, or it cannot be loaded.
    """
    from bittern.tokenization import load_tokenizer as load

    return load(model_path, "bittern eval")


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """int64 ``[T]`` ids of ``text`` as one sequence.

    No special tokens are added by the tokenizer (so no EOS, no per-call BOS/separator conventions), except
    that the tokenizer's ``bos_token``, if it has one, is prepended once: models are trained to see a
    document start after BOS, and it lets the first real token be scored. Windows after the first do not
    get a BOS of their own.
    """
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None) if getattr(tokenizer, "bos_token", None) is not None else None
    if bos is not None:
        ids.insert(0, int(bos))
    return torch.tensor(ids, dtype=torch.long)


def evaluate_file(
    model_path: str | Path,
    data_path: str | Path,
    *,
    window: int | None = None,
    stride: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    max_tokens: int | None = None,
    layers: str = "auto",
    batch_size: int = 8,
    progress: bool | None = None,
    adapter: str | Path | None = None,
) -> PerplexityResult:
    """``bittern eval``: perplexity of the checkpoint at ``model_path`` on the text in ``data_path``.

    The model is loaded with :func:`bittern.load_model` (any layout bittern reads), the tokenizer with
    ``AutoTokenizer.from_pretrained(model_path)``. The text (see :func:`read_text` for ``.jsonl``) is
    tokenized as one sequence (:func:`tokenize`: BOS once if the tokenizer has one, no other special tokens),
    cut to ``max_tokens`` and scored by :func:`sliding_window_nll`.

    Args:
        window: tokens per forward pass; default ``min(config.max_position_embeddings, 1024)``.
        stride: tokens between window starts, in ``[1, window]``; default ``window // 2``. Each window after
            the first scores only its last ``stride`` predictions, so every token it scores has at least
            ``window - stride + 1`` tokens of context; ``stride == window`` means disjoint windows.
        dtype: dtype of the dense parameters (``torch.bfloat16``/``"bfloat16"``, float16, float32; default
            float32). Log-softmax is always float32.
        device: default ``cuda`` if available, else ``cpu``.
        max_tokens: keep only the first ``max_tokens`` ids (BOS included), ``>= 2``.
        layers: passed to :func:`bittern.load_model` (``auto``: packed/bf16 → TernaryLinear, prequantized →
            BitLinear).
        batch_size: windows per forward pass.
        adapter: a PEFT LoRA adapter directory evaluated on the model (base + adapter, unmerged).

    Raises:
        ConfigError: bad arguments, or a missing, empty or malformed data file (named).
        MissingFileError: no tokenizer in ``model_path``.
        CheckpointError: the checkpoint cannot be read (see :func:`bittern.load_model`).
    """
    from bittern.checkpoint import load_model

    if window is not None:
        _check_int("window", window, 2)
    if stride is not None:
        _check_int("stride", stride, 1)
    if max_tokens is not None:
        _check_int("max_tokens", max_tokens, 2)
    torch_dtype = devices.resolve_dtype(dtype, torch.float32)
    torch_device = devices.resolve_device(device)
    text = read_text(data_path)  # the cheap checks first, then the tokenizer, then the model
    tokenizer = load_tokenizer(model_path)
    ids = tokenize(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ConfigError(f"data file '{data_path}' gives {ids.numel()} token(s); at least 2 are needed")
    model = load_model(model_path, layers=layers, dtype=torch_dtype, device=torch_device)  # type: ignore[arg-type]
    if adapter is not None:
        from bittern.engine.engine import attach_adapter

        model = attach_adapter(model, adapter)
    if window is None:
        window = default_window(model)
    if stride is None:
        stride = max(window // 2, 1)
    return sliding_window_nll(model, ids, window, stride, batch_size, progress=progress)


def describe_variant(model_path: str | Path) -> str:
    """A short name of the checkpoint's layout: ``packed (divide)``, ``packed (multiply)``, ``bf16``,
    ``prequantized``, ``full`` (a plain checkpoint) or ``gguf`` (a GGUF file)."""
    from bittern import formats

    directory = Path(model_path)
    if formats.gguf.is_gguf_file(directory):
        return "gguf"
    config = formats.read_config(directory)
    fmt = formats.detect_format(config, directory)
    if fmt != "packed":
        return fmt
    return f"packed ({formats.packed.scale_convention(config)})"
