"""A run's tokenizer and its training and held-out data, text or chat."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from bittern.errors import ConfigError
from bittern.train.config import TrainConfig
from bittern.train.data import (
    Corpus,
    PackedBlocks,
    require,
    split_documents,
    token_split,
    tokenize_documents,
)
from bittern.train.ranks import is_main_process


def prepare_tokenizer(config: TrainConfig, corpus: Corpus, run_dir: Path):
    """The run's tokenizer, saved once under ``run_dir/tokenizer`` and reloaded from there on resume.

    It gets ``config.chat_template`` when one is given, and :data:`~bittern.tokenization.DEFAULT_CHAT_TEMPLATE` when
    the data is chat and the tokenizer has none (a tokenizer bittern trains never has one).
    """
    from bittern.tokenization import DEFAULT_CHAT_TEMPLATE, set_chat_template
    from bittern.train.tokenizer import load_tokenizer, train_bpe_tokenizer

    saved = run_dir / "tokenizer"
    if saved.exists():
        return load_tokenizer(saved)
    if config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer)
    elif config.model is not None:
        tokenizer = load_tokenizer(config.model, config.gguf_file, option="--model")
    else:
        documents = corpus.documents or [json.dumps(c) for c in corpus.conversations]
        split = split_documents(len(documents), config.eval_fraction)
        train_docs = [documents[i] for i in split[0]] if split else documents
        tokenizer = train_bpe_tokenizer(train_docs, config.vocab_size)
    if config.chat_template is not None:
        set_chat_template(tokenizer, config.chat_template)
    elif corpus.is_chat and not getattr(tokenizer, "chat_template", None):
        set_chat_template(tokenizer, DEFAULT_CHAT_TEMPLATE)
    if is_main_process():
        tmp = run_dir / "tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save_pretrained(tmp)
        tmp.replace(saved)
    return tokenizer


def chat_template_note(config: TrainConfig, corpus: Corpus, tokenizer) -> list[str]:
    """A report note naming the chat template the run's tokenizer carries, when the run chose it."""
    from bittern.tokenization import CHAT_TEMPLATES, DEFAULT_CHAT_TEMPLATE

    template = getattr(tokenizer, "chat_template", None)
    if config.chat_template is not None:
        return [f"chat template: {config.chat_template} (--chat-template)"]
    if corpus.is_chat and template == CHAT_TEMPLATES[DEFAULT_CHAT_TEMPLATE]:
        return [f"chat template: {DEFAULT_CHAT_TEMPLATE} (the default for chat data; --chat-template sets another)"]
    return []


@dataclass
class TrainingData:
    train_set: object
    eval_set: object | None
    train_ids: torch.Tensor  # int64 [T]: the training token stream (for the unigram baseline)
    eval_ids: torch.Tensor  # int64 [E]: the held-out token stream (for the variants' perplexity)
    train_tokens: int
    how: str


def text_data(config: TrainConfig, corpus: Corpus, tokenizer) -> TrainingData:
    """Language modelling: the documents as one token stream, packed into blocks of ``seq_len``."""
    train_ids, held_ids, how = token_split(tokenizer, corpus.documents, config.eval_fraction)
    train_set = PackedBlocks(train_ids, config.seq_len)
    eval_ids = held_ids[: config.eval_tokens + 1]
    eval_set = PackedBlocks(eval_ids, config.seq_len) if eval_ids.numel() > config.seq_len else None
    return TrainingData(train_set, eval_set, train_ids, eval_ids, train_set.tokens, how)


def chat_data(config: TrainConfig, corpus: Corpus, tokenizer) -> TrainingData:
    """Supervised fine-tuning: conversations rendered by TRL through the tokenizer's chat template."""
    datasets = require("datasets", "chat data")
    require("trl", "chat data (TRL's SFTTrainer)")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat data ('messages') needs a tokenizer with a chat template; this one has none")
    conversations = corpus.conversations
    split = split_documents(len(conversations), config.eval_fraction)
    if split is None:
        raise ConfigError(
            f"chat data needs at least {round(1 / config.eval_fraction)} conversations to hold some out "
            f"(found {len(conversations)}); raise --eval-fraction or add conversations"
        )
    train_idx, held_idx = split
    rendered = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    train_ids = torch.tensor(tokenize_documents(tokenizer, [rendered[i] for i in train_idx]), dtype=torch.long)
    eval_ids = torch.tensor(tokenize_documents(tokenizer, [rendered[i] for i in held_idx]), dtype=torch.long)
    train_set = datasets.Dataset.from_list([{"messages": conversations[i]} for i in train_idx])
    eval_set = datasets.Dataset.from_list([{"messages": conversations[i]} for i in held_idx])
    how = f"every {round(1 / config.eval_fraction)}th conversation held out ({len(held_idx)} of {len(conversations)})"
    return TrainingData(train_set, eval_set, train_ids, eval_ids[: config.eval_tokens + 1], int(train_ids.numel()), how)
