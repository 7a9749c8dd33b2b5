"""Training data: read documents or chat conversations, tokenize, hold part out, pack into fixed-length blocks.

Sources (``--data``, repeatable; none means the embedded corpus of :mod:`bittern.train.corpus`):

* a text file (any extension except ``.jsonl``): one document;
* a ``.jsonl`` file: one JSON object per line, with ``"text"`` (a document) or ``"messages"`` (a chat
  conversation: a list of ``{"role", "content"}``, rendered through the tokenizer's chat template);
* a directory: every ``.txt``, ``.md``, ``.rst`` and ``.jsonl`` file under it, sorted by path, or, if it holds a
  dataset saved with :meth:`datasets.Dataset.save_to_disk`, that dataset (its ``text`` or ``messages`` column).

Hold-out: with at least ``1 / eval_fraction`` documents, every k-th document (k = round(1 / eval_fraction))
is held out, so held-out text never appears in training; with fewer documents, the last ``eval_fraction`` of
the token stream is held out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bittern.errors import ConfigError
from bittern.records import jsonl_records

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


@dataclass
class Corpus:
    """Documents and/or chat conversations read from the sources, in order."""

    documents: list[str]
    conversations: list[list[dict[str, str]]]
    description: str

    @property
    def is_chat(self) -> bool:
        return bool(self.conversations)


def _read_jsonl(path: Path, documents: list[str], conversations: list[list[dict[str, str]]]) -> None:
    for where, record in jsonl_records(path):
        _add_record(record, where, documents, conversations)


def _add_record(record: Any, where: str, documents: list[str], conversations: list[list[dict[str, str]]]) -> None:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        documents.append(record["text"])
    elif isinstance(record, dict) and isinstance(record.get("messages"), list):
        messages = record["messages"]
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ConfigError(f"{where}: every message needs 'role' and 'content'")
        conversations.append(messages)
    else:
        raise ConfigError(f"{where}: expected an object with a 'text' string or a 'messages' list")


def require(module: str, purpose: str):
    """Import an optional dependency of the ``train`` extra, or raise a :class:`ConfigError` saying how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{purpose} needs the '{module}' package: pip install 'bittern[train]'") from None


def _read_saved_dataset(path: Path, documents: list[str], conversations: list[list[dict[str, str]]]) -> None:
    datasets = require("datasets", f"--data {path} (a saved datasets directory)")

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ConfigError(f"{path}: a saved DatasetDict needs a 'train' split, found {list(dataset)}")
        dataset = dataset["train"]
    if "text" not in dataset.column_names and "messages" not in dataset.column_names:
        raise ConfigError(f"{path}: the dataset needs a 'text' or 'messages' column, has {dataset.column_names}")
    for index, record in enumerate(dataset):
        _add_record(record, f"{path}: row {index}", documents, conversations)


def read_corpus(sources: Sequence[str | Path]) -> Corpus:
    """Read every source (see the module docstring); an empty list reads the embedded corpus.

    Raises:
        ConfigError: a missing path, an empty file, a malformed jsonl line, or text mixed with chat.
    """
    if not sources:
        from bittern.train.corpus import default_corpus

        return Corpus(default_corpus(), [], "embedded corpus (pydoc_data topics + stdlib docstrings)")
    documents: list[str] = []
    conversations: list[list[dict[str, str]]] = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"--data {path}: no such file or directory")
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                _read_saved_dataset(path, documents, conversations)
                continue
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl"))
            if not files:
                raise ConfigError(f"--data {path}: the directory holds no {', '.join(TEXT_SUFFIXES)} or .jsonl files")
        else:
            files = [path]
        for file in files:
            before = len(documents) + len(conversations)
            if file.suffix == ".jsonl":
                _read_jsonl(file, documents, conversations)
            else:
                try:
                    text = file.read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    raise ConfigError(f"--data {file}: not UTF-8 text") from None
                if text.strip():
                    documents.append(text)
            if len(documents) + len(conversations) == before:
                raise ConfigError(f"--data {file}: the file is empty")
    if documents and conversations:
        raise ConfigError("--data mixes plain text and chat conversations ('messages'); train on one kind at a time")
    names = ", ".join(str(s) for s in sources)
    return Corpus(documents, conversations, names)


def split_documents(count: int, eval_fraction: float) -> tuple[list[int], list[int]] | None:
    """Indices ``(train, held_out)`` holding out every k-th document, or None if there are too few documents
    (then the caller splits the token stream instead)."""
    if not 0.0 < eval_fraction < 0.5:
        raise ConfigError(f"--eval-fraction must lie in (0, 0.5), got {eval_fraction}")
    every = round(1.0 / eval_fraction)
    if count < every:
        return None
    held_out = list(range(every // 2, count, every))
    held = set(held_out)
    return [i for i in range(count) if i not in held], held_out


def tokenize_documents(tokenizer, documents: Sequence[str]) -> list[int]:
    """One token stream: each document's tokens followed by the tokenizer's EOS token (the separator).

    Returns:
        token ids (Python ints), ``sum(len(doc tokens) + 1)`` long.
    """
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos_token; documents need a separator token")
    stream: list[int] = []
    encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    for ids in encoded:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    return stream


def token_split(tokenizer, documents: Sequence[str], eval_fraction: float) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Tokenize and split into ``(train_ids, held_out_ids, how)``: int64 1-D tensors and a sentence saying how."""
    split = split_documents(len(documents), eval_fraction)
    if split is not None:
        train_idx, held_idx = split
        train = tokenize_documents(tokenizer, [documents[i] for i in train_idx])
        held = tokenize_documents(tokenizer, [documents[i] for i in held_idx])
        how = f"every {round(1 / eval_fraction)}th document held out ({len(held_idx)} of {len(documents)})"
    else:
        stream = tokenize_documents(tokenizer, documents)
        cut = int(len(stream) * (1.0 - eval_fraction))
        train, held = stream[:cut], stream[cut:]
        how = f"last {eval_fraction:.0%} of the token stream held out ({len(documents)} documents)"
    return torch.tensor(train, dtype=torch.long), torch.tensor(held, dtype=torch.long), how


class PackedBlocks(torch.utils.data.Dataset):
    """A token stream cut into consecutive blocks of ``seq_len`` tokens (the remainder is dropped).

    Each item is ``{"input_ids": int64 [seq_len], "labels": int64 [seq_len]}`` (labels = inputs; the model
    shifts them), so every block has the same number of predicted tokens — which keeps a loss averaged over
    devices equal to the loss over the global batch.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int) -> None:
        if seq_len < 2:
            raise ConfigError(f"--seq-len must be at least 2, got {seq_len}")
        count = ids.numel() // seq_len
        if count == 0:
            raise ConfigError(f"the text has {ids.numel()} tokens, fewer than one block of --seq-len {seq_len}")
        self.blocks = ids[: count * seq_len].view(count, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block}

    @property
    def tokens(self) -> int:
        return self.blocks.numel()


def unigram_perplexity(train_ids: torch.Tensor, held_out_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on ``held_out_ids`` of the add-one-smoothed unigram distribution of ``train_ids``: the floor
    any language model must clearly beat."""
    counts = torch.bincount(train_ids, minlength=vocab_size).to(torch.float64) + 1.0
    log_probs = (counts / counts.sum()).log()
    return float(torch.exp(-log_probs[held_out_ids].mean()))
