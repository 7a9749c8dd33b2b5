"""Incremental detokenization (:mod:`bittern.engine.detokenize`) against decoding the whole token list."""

from __future__ import annotations

import torch
from engine_models import VOCAB, tokenizer

from bittern.engine.detokenize import IncrementalText
from bittern.engine.text import RowText


def test_incremental_text_equals_whole_decoding_and_stream_pieces_add_up() -> None:
    tok = tokenizer()
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # random ids: byte pieces split multi-byte characters across tokens
        ids = torch.randint(0, VOCAB, (40,), generator=generator).tolist()
        text = IncrementalText(tok)
        pieces = []
        for token in ids:
            text.add(token)
            pieces.append(text.take_delta())
        text.flush()
        pieces.append(text.take_delta(final=True))
        assert text.text == tok.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == text.text


def test_stop_strings_cut_the_text_as_row_text_does() -> None:
    tok = tokenizer()
    ids = tok("The import statement finds a module, loads it and binds a name.")["input_ids"]
    for stop in (["module"], ["ds a", "zzz"], [" name."], ["never there"]):
        incremental, whole = IncrementalText(tok, stop), RowText(tok, stop)
        pieces = []
        for token in ids:
            incremental.add(token)
            whole.add(token)
            pieces.append(incremental.take_delta())
            assert incremental.stopped == whole.stopped
        incremental.flush()
        pieces.append(incremental.take_delta(final=True))
        assert incremental.text == whole.text and "".join(pieces) == whole.text
        assert incremental.ids == whole.ids  # both stop taking tokens at the same one
