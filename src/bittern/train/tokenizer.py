"""Tokenizers: load one, or train a byte-level BPE tokenizer locally with Hugging Face ``tokenizers``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bittern.errors import BitternError, ConfigError

#: The one special token of a locally trained tokenizer: document separator, BOS, EOS and padding at once.
END_OF_TEXT = "<|endoftext|>"


def train_bpe_tokenizer(documents: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``documents`` (deterministic for the same input).

    Returns:
        a :class:`transformers.PreTrainedTokenizerFast` with ``<|endoftext|>`` as bos/eos/pad token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ConfigError(f"--vocab-size must be at least 300 (256 bytes + merges), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=1_000_000,
    )


def load_tokenizer(path: str | Path, gguf_file: str | None = None, option: str = "--tokenizer"):
    """Load a Hugging Face tokenizer from a directory (or from a GGUF file in it), with a clear error if absent.

    Args:
        option: the command-line option that gave ``path`` (``--tokenizer`` or ``--model``), named in errors.

    Raises:
        ConfigError: ``path`` is not a directory, holds no tokenizer files (for ``--model``: or is no checkpoint
            directory at all), or its files cannot be loaded; the message names ``option`` and ``path``.
    """
    from bittern.tokenization import load_tokenizer as load_checkpoint_tokenizer
    from bittern.tokenization import tokenizer_files

    directory = Path(path)
    if not directory.is_dir():
        why = "it is a file" if directory.exists() else "it does not exist"
        raise ConfigError(f"{option} {directory}: not a directory ({why})")
    if gguf_file is None and not tokenizer_files(directory):
        files = "tokenizer.json, tokenizer_config.json, ..."
        if option == "--model" and not (directory / "config.json").is_file():
            raise ConfigError(
                f"--model {directory}: not a checkpoint directory (it holds no config.json and no tokenizer files)"
            )
        hint = "; give the tokenizer with --tokenizer DIR" if option == "--model" else ""
        raise ConfigError(f"{option} {directory}: no usable tokenizer files ({files}) in the directory{hint}")
    try:
        tokenizer = load_checkpoint_tokenizer(directory / gguf_file if gguf_file else directory, option)
    except BitternError as error:
        reason = str(error.__cause__ or error).splitlines()[0]
        raise ConfigError(f"{option} {directory}: no usable tokenizer files ({reason})") from None
    if tokenizer.eos_token is None:
        raise ConfigError(f"{option} {directory}: the tokenizer has no eos_token; documents need a separator token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
