"""The prompt's forward: length buckets, and left padding to a bucket changing no generated token (on the CPU, the
eager prefill run at the bucket's length — what the graphed prefill replays on a GPU)."""

from __future__ import annotations

import itertools

import pytest
import torch
from engine_models import synthetic_tokens, tokenizer, trained_model

from bittern.engine import Engine
from bittern.engine.prefill import EagerPrefill, bucket_length, bucket_lengths

pytestmark = pytest.mark.usefixtures("single_thread")

NEW = 12


def test_buckets_are_powers_of_two_and_one_and_a_half_times_them() -> None:
    assert bucket_lengths(128) == [16, 24, 32, 48, 64, 96, 128]
    assert bucket_lengths(100) == [16, 24, 32, 48, 64, 96]
    assert bucket_lengths(15) == []
    lengths = bucket_lengths(1 << 14)
    assert all(b / a <= 1.5 for a, b in itertools.pairwise(lengths))  # at most a third padding


@pytest.mark.parametrize(
    ("prompt", "new", "limit", "expected"),
    [(1, 8, 128, 16), (16, 8, 128, 16), (17, 8, 128, 24), (97, 8, 128, None), (90, 30, 128, 96),
     (90, 40, 128, None), (200, 1, 2048, 256)],
)  # fmt: skip
def test_bucket_leaves_room_for_the_new_tokens(prompt: int, new: int, limit: int, expected: int | None) -> None:
    assert bucket_length(prompt, new, limit) == expected


class _BucketedEagerPrefill(EagerPrefill):
    """The eager prefill padded to the graphed one's buckets."""

    def length(self, prompt_len: int, new_tokens: int) -> int:
        bucket = bucket_length(prompt_len, new_tokens, self.cache.max_seq_len)
        return prompt_len if bucket is None else bucket


@pytest.mark.parametrize("arch", ["llama", "bitnet"])
def test_padding_the_prompt_to_its_bucket_changes_no_token(arch: str) -> None:
    model = trained_model(arch)
    rows = synthetic_tokens(3, 21, seed=5)
    prompts = [rows[0, :5].tolist(), rows[1, :21].tolist(), rows[2, :9].tolist()]
    plain = Engine(model, tokenizer(), max_batch=4, max_seq_len=128)
    padded = Engine(model, tokenizer(), max_batch=4, max_seq_len=128)
    padded._prefill = _BucketedEagerPrefill(padded.decoder, padded.cache)
    assert padded._prefill.length(21, NEW) == 24 and plain._prefill_runner().length(21, NEW) == 21
    for options in ({}, {"repetition_penalty": 2.0}):
        want = plain.generate_ids(prompts, NEW, ignore_eos=True, **options)
        got = padded.generate_ids(prompts, NEW, ignore_eos=True, **options)
        assert got.token_ids == want.token_ids
        assert got.prompt_token_ids == prompts


def test_padded_prefill_logits_equal_the_unpadded_ones() -> None:
    engine = Engine(trained_model("bitnet"), tokenizer(), max_batch=2, max_seq_len=64)
    prefill = EagerPrefill(engine.decoder, engine.cache)
    ids = synthetic_tokens(1, 11, seed=3)
    with torch.inference_mode():
        want = prefill(ids, torch.zeros(1, dtype=torch.long)).clone()
        padded = torch.cat([torch.full((1, 5), engine.pad_token_id), ids], dim=1)  # 16 slots, 5 of them padding
        got = prefill(padded, torch.tensor([5]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.argmax(-1).item() == want.argmax(-1).item()
