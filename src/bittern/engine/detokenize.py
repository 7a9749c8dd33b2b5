"""Incremental detokenization for many concurrent rows: each new token costs the decoding of a few tokens, not of
the whole row (:class:`~bittern.engine.text.RowText` decodes the whole row after every token, which is simple and
right for one batch, but quadratic in the row's length on a server)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bittern.engine.text import INCOMPLETE, StreamedText


class IncrementalText(StreamedText):
    """The generated text of one request, grown token by token, with stop strings and a streamable part.

    Each token decodes only the tokens since the last complete piece of text (the "prefix/read offsets" method):
    ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])`` is the new text, taken once it no longer ends in an
    incomplete UTF-8 character. For tokenizers whose decoding of a token list is the concatenation of its pieces'
    (byte-level BPE, SentencePiece), :attr:`text` equals ``tokenizer.decode(ids, skip_special_tokens=True)`` cut
    before the first stop string.

    Args:
        tokenizer: a Hugging Face tokenizer (``decode``).
        stop: stop strings (empty strings are ignored): the text ends just before the first one that appears, and
            :attr:`stopped` is set; tokens added after that are ignored.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        super().__init__(tokenizer, stop)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> None:
        """Append a token (ignored once stopped) and update :attr:`text` / :attr:`stopped`."""
        if self.stopped:
            return
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(INCOMPLETE):
            self._append(after[len(before) :])
            self._prefix, self._read = self._read, len(self.ids)

    def flush(self) -> None:
        """Take the text of tokens still held back as an incomplete character (nothing more will arrive)."""
        if self.stopped or self._read == len(self.ids):
            return
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before):
            self._append(after[len(before) :])
        self._prefix = self._read = len(self.ids)

    def _append(self, piece: str) -> None:
        start = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
