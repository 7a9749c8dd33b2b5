"""The text of one generated row, as tokens arrive: stop strings, and the part that is safe to stream."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

INCOMPLETE = "\ufffd"  # what a byte-level tokenizer decodes an incomplete UTF-8 sequence to


class StreamedText:
    """What every generated row's text shares: stop strings, :attr:`text` cut before the first one that appears
    (:attr:`stopped` then set), and :meth:`take_delta`, the part safe to stream. Subclasses decide how tokens
    become text (:meth:`add`).

    Args:
        tokenizer: a Hugging Face tokenizer (``decode``).
        stop: stop strings (empty strings are ignored).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._emitted = 0

    def add(self, token_id: int) -> None:
        """Append a token (ignored once stopped) and update :attr:`text` / :attr:`stopped`."""
        raise NotImplementedError

    def _stop_prefix(self) -> int:
        """The longest tail of :attr:`text` that could still grow into a stop string (0 once stopped)."""
        if self.stopped:
            return 0
        hold = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        return hold

    def _held_back(self) -> int:
        """Characters at the end of :attr:`text` not to stream yet."""
        return self._stop_prefix()

    def take_delta(self, final: bool = False) -> str:
        """Text not returned by earlier calls; with ``final``, everything (nothing more will arrive)."""
        end = len(self.text) if final else len(self.text) - self._held_back()
        if end <= self._emitted:
            return ""
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta


class RowText(StreamedText):
    """Decoded text of one row's generated tokens.

    The whole token list is decoded after each token (``skip_special_tokens=True``), so multi-token characters
    come out right. :meth:`take_delta` also holds back a trailing incomplete character.
    """

    def add(self, token_id: int) -> None:
        """Append a token (ignored once stopped) and update :attr:`text` / :attr:`stopped`."""
        if self.stopped:
            return
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            text = text[: min(hits)]
            self.stopped = True
        self.text = text

    def _held_back(self) -> int:
        """A trailing incomplete character, or a tail that may turn out to be a stop string."""
        if self.stopped:
            return 0
        return max(len(self.text) - len(self.text.rstrip(INCOMPLETE)), self._stop_prefix())
