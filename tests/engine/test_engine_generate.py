"""Generation: greedy against transformers' ``generate``, batching of different-length prompts, stop strings,
EOS, sampling options, streaming and the chat template."""

from __future__ import annotations

import copy

import pytest
import torch
from engine_models import synthetic_tokens, tokenizer, trained_model

from bittern.engine import Engine
from bittern.errors import ConfigError, MissingFileError

NEW = 24


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=["llama", "bitnet"])
def engine(request) -> Engine:
    return Engine(trained_model(request.param), tokenizer(), max_batch=4, max_seq_len=128)


def _prompts(lengths: list[int], seed: int = 11) -> list[list[int]]:
    rows = synthetic_tokens(len(lengths), max(lengths), seed=seed)
    return [rows[i, :n].tolist() for i, n in enumerate(lengths)]


def _hf_generate(model: torch.nn.Module, prompt: list[int], new: int, **options) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0, **options)
    return out[0, len(prompt) :].tolist()


def test_greedy_equals_transformers_generate(engine: Engine) -> None:
    reference = copy.deepcopy(engine.model)
    for prompt in _prompts([5, 17]):
        result = engine.generate_ids([prompt], NEW, ignore_eos=True)
        expected = _hf_generate(reference, prompt, NEW, min_new_tokens=NEW)
        assert result.token_ids[0] == expected
        assert result.finish_reasons == ["length"] and result.decode_tokens == NEW - 1


def test_repetition_penalty_equals_transformers(engine: Engine) -> None:
    reference = copy.deepcopy(engine.model)
    prompt = _prompts([12])[0]
    plain = engine.generate_ids([prompt], NEW, ignore_eos=True).token_ids[0]
    penalized = engine.generate_ids([prompt], NEW, repetition_penalty=3.0, ignore_eos=True).token_ids[0]
    assert penalized == _hf_generate(reference, prompt, NEW, repetition_penalty=3.0, min_new_tokens=NEW)
    assert penalized != plain


def test_batched_prompts_of_different_lengths_equal_one_by_one(engine: Engine) -> None:
    prompts = _prompts([3, 20, 9, 14, 6])  # five rows: more than max_batch (4), so two chunks
    together = engine.generate_ids(prompts, NEW, ignore_eos=True)
    for prompt, ids in zip(prompts, together.token_ids, strict=True):
        assert engine.generate_ids([prompt], NEW, ignore_eos=True).token_ids[0] == ids
    assert together.prompt_token_ids == prompts
    assert together.decode_tokens == 5 * (NEW - 1)


def test_eos_ends_a_row_and_the_others_go_on(engine: Engine) -> None:
    prompts = _prompts([4, 10])
    free = engine.generate_ids(prompts, NEW, ignore_eos=True).token_ids
    token = free[0][6]  # make row 0's seventh token the end of sequence
    assert token not in free[1] and token not in free[0][:6]
    saved = engine.eos_token_ids
    engine.eos_token_ids = [token]
    try:
        result = engine.generate_ids(prompts, NEW)
    finally:
        engine.eos_token_ids = saved
    assert result.token_ids[0] == free[0][:7] and result.finish_reasons == ["eos", "length"]
    assert result.token_ids[1] == free[1]
    assert result.texts[0] == engine.tokenizer.decode(free[0][:6])


def test_stop_strings_cut_the_text(engine: Engine) -> None:
    prompt = _prompts([8])[0]
    full = engine.generate_ids([prompt], NEW, ignore_eos=True)
    text = full.texts[0]
    assert len(text) > 12
    stop = text[8:12]
    first = text.find(stop)
    result = engine.generate_ids([prompt], NEW, stop=[stop, "never appears \u2603"], ignore_eos=True)
    assert result.texts == [text[:first]] and result.finish_reasons == ["stop"]
    ids = result.token_ids[0]
    assert ids == full.token_ids[0][: len(ids)] and len(ids) < NEW
    assert stop in engine.tokenizer.decode(ids) and stop not in engine.tokenizer.decode(ids[:-1])


def test_only_greedy_without_processors_may_take_the_argmax_as_it_is() -> None:
    from bittern.engine.sampling import Sampler, SamplingParams

    cpu = torch.device("cpu")
    assert Sampler(SamplingParams(), cpu).plain_greedy
    assert not Sampler(SamplingParams(repetition_penalty=1.3), cpu).plain_greedy
    assert not Sampler(SamplingParams(temperature=0.7), cpu).plain_greedy
    assert Sampler(SamplingParams(repetition_penalty=1.0), cpu).plain_greedy


def test_top_k_1_and_tiny_top_p_equal_greedy(engine: Engine) -> None:
    prompts = _prompts([6, 11])
    greedy = engine.generate_ids(prompts, NEW, ignore_eos=True).token_ids
    assert engine.generate_ids(prompts, NEW, temperature=1.5, top_k=1, seed=0, ignore_eos=True).token_ids == greedy
    assert engine.generate_ids(prompts, NEW, temperature=1.5, top_p=1e-6, seed=1, ignore_eos=True).token_ids == greedy


def test_sampling_follows_the_seed(engine: Engine) -> None:
    prompts = _prompts([6, 11])
    options = dict(temperature=5.0, top_k=50, top_p=0.95, ignore_eos=True)
    first = engine.generate_ids(prompts, NEW, seed=3, **options).token_ids
    assert engine.generate_ids(prompts, NEW, seed=3, **options).token_ids == first
    assert engine.generate_ids(prompts, NEW, seed=4, **options).token_ids != first
    greedy = engine.generate_ids(prompts, NEW, ignore_eos=True).token_ids
    assert first != greedy


def test_top_k_limits_the_choice(engine: Engine) -> None:
    """Every sampled token is among the k most likely ones (checked against the teacher-forced logits)."""
    prompt = _prompts([9])[0]
    ids = engine.generate_ids([prompt], NEW, temperature=10.0, top_k=3, seed=5, ignore_eos=True).token_ids[0]
    sequence = torch.tensor([prompt + ids])
    logits = engine.logits(sequence)[0, len(prompt) - 1 : -1]
    top3 = logits.topk(3, dim=-1).indices
    assert all(int(t) in top3[i].tolist() for i, t in enumerate(ids))
    assert len(set(ids)) > 1


def test_streaming_pieces_add_up_to_the_texts(engine: Engine) -> None:
    prompts = _prompts([5, 13])
    pieces: dict[int, list[str]] = {0: [], 1: []}
    result = engine.generate_ids(prompts, NEW, stream=lambda row, text: pieces[row].append(text), ignore_eos=True)
    assert ["".join(pieces[row]) for row in (0, 1)] == result.texts
    assert len(pieces[0]) > 1
    stop = result.texts[1][3:6]
    pieces = {0: [], 1: []}
    stopped = engine.generate_ids(prompts, NEW, stop=[stop], stream=lambda r, t: pieces[r].append(t), ignore_eos=True)
    assert "".join(pieces[1]) == stopped.texts[1] and stop not in "".join(pieces[1])


def test_stream_true_prints_one_prompt(engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    result = engine.generate("The import statement", 12, stream=True)
    assert capsys.readouterr().out == result.text
    with pytest.raises(ConfigError, match="one prompt"):
        engine.generate(["a", "b"], 4, stream=True)


def test_text_prompts_are_tokenized_with_the_tokenizer(engine: Engine) -> None:
    texts = ["The import statement", "A list"]
    result = engine.generate(texts, 10, ignore_eos=True)
    assert result.prompt_token_ids == [engine.tokenizer(t)["input_ids"] for t in texts]
    assert result.texts == [engine.tokenizer.decode(ids, skip_special_tokens=True) for ids in result.token_ids]
    assert result.prefill_tokens_per_second > 0 and result.decode_tokens_per_second > 0


def test_chat_applies_the_template(engine: Engine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    prompt = engine.chat_prompt(messages)
    text = "<|system|>Be brief.\n<|user|>What is a list?\n<|assistant|>"
    assert prompt == engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert engine.chat(messages, 10).token_ids == engine.generate_ids([prompt], 10).token_ids
    with pytest.raises(ConfigError, match="role"):
        engine.chat_prompt([{"content": "no role"}])


def test_no_chat_template_is_a_clear_error() -> None:
    plain = tokenizer()
    plain.chat_template = None
    engine = Engine(trained_model("llama"), plain, max_seq_len=64)
    with pytest.raises(ConfigError, match="no chat template"):
        engine.chat([{"role": "user", "content": "hi"}])


def test_bad_requests_name_the_argument(engine: Engine) -> None:
    with pytest.raises(ConfigError, match="prompt 1 has no tokens"):
        engine.generate_ids([[1, 2], []], 4)
    with pytest.raises(ConfigError, match="vocabulary"):
        engine.generate_ids([[1, 10_000]], 4)
    with pytest.raises(ConfigError, match="max_seq_len"):
        engine.generate_ids([[1] * 100], 29)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        engine.generate_ids([[1]], 0)
    with pytest.raises(ConfigError, match="temperature"):
        engine.generate_ids([[1]], 4, temperature=-1.0)
    with pytest.raises(ConfigError, match="top_p"):
        engine.generate_ids([[1]], 4, top_p=1.5)
    bare = Engine(trained_model("llama"), None, max_seq_len=64)
    with pytest.raises(MissingFileError, match="tokenizer"):
        bare.generate("text", 4)
    assert bare.generate_ids([[1, 2, 3]], 4).texts == [""]


@pytest.mark.parametrize("vocab", [7, 256, 1000, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_equal_argmax_with_its_tie_rule(vocab: int, dtype: torch.dtype) -> None:
    from bittern.engine.sampling import greedy_tokens

    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=generator).to(dtype)
    logits[1, vocab // 3] = logits[1, -1] = 50.0  # equal maxima in different pieces: the first wins
    logits[2] = float("-inf")  # nothing above -inf: token 0
    logits[3, vocab // 2] = float("nan")  # NaN counts as the maximum
    logits[4, :] = 1.0  # all equal
    want = logits.float().argmax(dim=-1)
    assert torch.equal(greedy_tokens(logits), want)
    assert want[1] == vocab // 3 and want[2] == 0 and want[3] == vocab // 2 and want[4] == 0
