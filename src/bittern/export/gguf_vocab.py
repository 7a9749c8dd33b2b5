"""Tokenizer metadata for GGUF, read from a Hugging Face tokenizer.

Two families are written, as llama.cpp's tokenizers expect them:

* byte-level BPE (GPT-2 style: ``tokenizer.json`` with a BPE model and a ``ByteLevel`` decoder) →
  ``tokenizer.ggml.model = "gpt2"``: tokens in their byte-level spelling, the merges, and a pre-tokenizer name
  (``tokenizer.ggml.pre``) that selects llama.cpp's matching split regex;
* SentencePiece BPE (Llama 2 style: BPE with ``byte_fallback`` and ``▁`` for spaces, whether the directory has
  ``tokenizer.model`` or only ``tokenizer.json``) → ``tokenizer.ggml.model = "llama"``: pieces, scores
  (``-rank`` of the merge that creates each piece, so llama.cpp's score-driven merging follows the same order)
  and token types (``<0xXX>`` byte pieces are BYTE).

Special token ids, whether BOS/EOS are added, and the chat template come from the Hugging Face tokenizer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bittern.errors import ConfigError, MissingFileError

PRE_TOKENIZERS = ("gpt-2", "smollm", "llama-bpe", "default")
"""Names of llama.cpp pre-tokenizers bittern detects or accepts (``--pre-tokenizer``); llama.cpp knows more."""

_LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class GGUFVocab:
    """What llama.cpp needs to tokenize like the Hugging Face tokenizer.

    Attributes:
        model: ``gpt2`` (byte-level BPE) or ``llama`` (SentencePiece).
        pre: llama.cpp pre-tokenizer name (``gpt2`` only).
        tokens: one string per id, ``vocab_size`` of them (ids the tokenizer does not use are ``[PAD{id}]``).
        types: ``gguf.TokenType`` value per id.
        scores: per id (``llama`` only).
        merges: ``"a b"`` strings in rank order (``gpt2`` only).
        special: ``bos`` / ``eos`` / ``unk`` / ``pad`` → id.
        add_bos, add_eos: whether llama.cpp adds them when tokenizing (as the Hugging Face tokenizer does).
        add_space_prefix: ``llama`` only: a ``▁`` is put before the text.
        chat_template: the Jinja chat template, if any.
    """

    model: str
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    chat_template: str | None = None


def load_hf_tokenizer(directory: str | Path) -> Any:
    """The fast Hugging Face tokenizer of a checkpoint directory.

    Raises:
        MissingFileError: no tokenizer files, or they cannot be loaded as a fast tokenizer.
    """
    from bittern.formats.common import TOKENIZER_FILES
    from bittern.tokenization import load_tokenizer

    directory = Path(directory)
    present = [n for n in TOKENIZER_FILES if n != "generation_config.json" and (directory / n).is_file()]
    if not present:
        raise MissingFileError(
            "no tokenizer files; a GGUF file carries the tokenizer, so the source directory must hold one "
            "(tokenizer.json)",
            directory,
        )
    tokenizer = load_tokenizer(directory, "the GGUF export")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"'{directory}': the tokenizer has no fast (tokenizer.json) form; bittern reads only that")
    return tokenizer


def _pre_tokenizer_name(spec: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer description from ``tokenizer.json``, if known."""
    if not spec:
        return None
    steps = spec.get("pretokenizers") if spec.get("type") == "Sequence" else [spec]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex", "")
        if pattern.startswith(_LLAMA3_SPLIT):
            return "llama-bpe"
    return None


def _merge_strings(merges: list[Any]) -> list[str]:
    """``tokenizer.json`` merges (``"a b"`` or ``["a", "b"]``) as ``"a b"`` strings; a space inside a part is
    written as U+0120 + 256, the spelling llama.cpp reads."""
    out = []
    for merge in merges:
        if isinstance(merge, str):
            out.append(merge)
        else:
            out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in merge))
    return out


def vocab_from_tokenizer(tokenizer: Any, vocab_size: int, pre_tokenizer: str | None = None) -> GGUFVocab:
    """Describe a fast Hugging Face tokenizer as GGUF tokenizer metadata.

    Args:
        tokenizer: a ``PreTrainedTokenizerFast``.
        vocab_size: the model's embedding rows (``>=`` the tokenizer's size; extra ids become unused tokens).
        pre_tokenizer: override the detected llama.cpp pre-tokenizer name (byte-level BPE only).

    Raises:
        ConfigError: a tokenizer family llama.cpp cannot reproduce here (Unigram, WordPiece, ...), a byte-level
            pre-tokenizer bittern cannot name (pass ``pre_tokenizer``), or more tokens than embedding rows.
    """
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    vocab: dict[str, int] = dict(tokenizer.get_vocab())
    size = max(vocab.values()) + 1 if vocab else 0
    if size > vocab_size:
        raise ConfigError(f"the tokenizer has {size} tokens but the model only {vocab_size} embedding rows")
    special_ids = set(tokenizer.all_special_ids)
    added = {entry["id"] for entry in spec.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, index in vocab.items():
        tokens[index] = text
        if index in special_ids:
            types[index] = int(gguf.TokenType.CONTROL)
        elif index in added:
            types[index] = int(gguf.TokenType.USER_DEFINED)
        else:
            types[index] = int(gguf.TokenType.NORMAL)

    kind = model.get("type")
    byte_level = decoder.get("type") == "ByteLevel"
    if kind == "BPE" and byte_level and not model.get("byte_fallback", False):
        name = pre_tokenizer or _pre_tokenizer_name(spec.get("pre_tokenizer"))
        if name is None:
            raise ConfigError(
                "cannot tell which llama.cpp pre-tokenizer matches this tokenizer's pre_tokenizer "
                f"{json.dumps(spec.get('pre_tokenizer'))[:200]}; pass pre_tokenizer= (--pre-tokenizer), e.g. one "
                f"of {', '.join(PRE_TOKENIZERS)} or another name llama.cpp knows"
            )
        result = GGUFVocab("gpt2", tokens, types, pre=name, merges=_merge_strings(model.get("merges") or []))
    elif kind == "BPE" and model.get("byte_fallback", False):
        scores = [0.0] * vocab_size
        for rank, merge in enumerate(_merge_strings(model.get("merges") or [])):
            left, _, right = merge.partition(" ")
            index = vocab.get(left + right)
            if index is not None and scores[index] == 0.0:
                scores[index] = -float(rank + 1)
        for text, index in vocab.items():
            if _BYTE_PIECE.match(text):
                types[index] = int(gguf.TokenType.BYTE)
            if model.get("unk_token") == text:
                types[index] = int(gguf.TokenType.UNKNOWN)
        prefix = "Prepend" in json.dumps(spec.get("normalizer")) or _metaspace_prepends(spec.get("pre_tokenizer"))
        result = GGUFVocab("llama", tokens, types, scores=scores, add_space_prefix=prefix)
    else:
        raise ConfigError(
            f"tokenizer model {kind!r} (decoder {decoder.get('type')!r}) is not exported to GGUF: bittern writes "
            "byte-level BPE (GPT-2 style) and SentencePiece BPE (Llama style) tokenizers"
        )
    for kind_name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind_name}_token_id", None)
        if token_id is not None:
            result.special[kind_name] = int(token_id)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    result.add_bos = "bos" in result.special and len(probe) > len(bare) and probe[0] == result.special["bos"]
    result.add_eos = "eos" in result.special and len(probe) > len(bare) and probe[-1] == result.special["eos"]
    template = getattr(tokenizer, "chat_template", None)
    result.chat_template = template if isinstance(template, str) else None
    return result


def _metaspace_prepends(spec: dict[str, Any] | None) -> bool:
    if not spec:
        return False
    steps = spec.get("pretokenizers") if spec.get("type") == "Sequence" else [spec]
    return any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" for s in steps)


def add_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Write ``vocab`` into a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.model == "llama":
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
