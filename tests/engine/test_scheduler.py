"""Continuous batching (:mod:`bittern.engine.scheduler`): requests of different lengths joining and leaving one
batch produce what they produce alone; per-request sampling, stop strings, log-probabilities, cancellation and the
waiting queue's limits."""

from __future__ import annotations

import itertools
import random
import threading
import time

import pytest
import torch
from engine_models import synthetic_tokens, tokenizer, trained_model

from bittern.engine import Engine
from bittern.engine.scheduler import (
    ContextLengthError,
    QueueFullError,
    Request,
    Scheduler,
    SchedulerClosedError,
)
from bittern.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


def _prompts(lengths: list[int], seed: int = 11) -> list[list[int]]:
    rows = synthetic_tokens(len(lengths), max(lengths), seed=seed)
    return [rows[i, :n].tolist() for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(trained_model("llama"), tokenizer(), max_batch=4, max_seq_len=128)


@pytest.fixture
def scheduler(engine: Engine):
    running = Scheduler(engine).start()
    yield running
    running.shutdown()


def _alone(engine: Engine, prompt: list[int], max_tokens: int, **options) -> list[int]:
    return engine.generate_ids([prompt], max_tokens, **options).token_ids[0]


def test_greedy_requests_joining_a_running_batch_equal_alone(engine: Engine) -> None:
    lengths, budgets = [3, 20, 9, 14, 6, 30, 2, 11], [24, 5, 40, 12, 30, 8, 17, 3]
    prompts = _prompts(lengths)
    expected = [_alone(engine, p, m, ignore_eos=True) for p, m in zip(prompts, budgets, strict=True)]
    scheduler = Scheduler(engine).start()
    try:  # eight requests on four rows: the short ones leave, the waiting ones take their rows mid-decode
        handles = [scheduler.submit(Request(p, m, ignore_eos=True)) for p, m in zip(prompts, budgets, strict=True)]
        results = [h.result(timeout=120) for h in handles]
    finally:
        scheduler.shutdown()
    assert [r.token_ids for r in results] == expected
    assert [r.finish_reason for r in results] == ["length"] * len(prompts)
    assert [r.completion_tokens for r in results] == budgets
    assert [r.prompt_tokens for r in results] == lengths
    stats = scheduler.stats
    assert stats.decode_steps < sum(budgets)  # rows decoded together
    assert stats.decode_tokens == sum(budgets) - len(prompts)  # each request's first token comes from its prefill
    assert stats.decode_rows >= stats.decode_tokens
    assert 1 <= stats.prefills <= len(prompts) and stats.prefill_tokens == sum(lengths)
    assert stats.prefill_slots >= stats.prefill_tokens and stats.prefill_seconds > 0


def test_rows_shift_when_spans_pass_the_cache_end() -> None:
    """A cache of 48 slots: requests whose prompt + generation nearly fill it force the running rows' slots to be
    shifted (left to make room at the end, right for a prompt longer than the clock); tokens are unchanged."""
    engine = Engine(trained_model("bitnet"), tokenizer(), max_batch=3, max_seq_len=48)
    rng = random.Random(0)
    lengths = [rng.randint(1, 30) for _ in range(12)]
    budgets = [rng.randint(1, 48 - n) for n in lengths]
    prompts = _prompts(lengths, seed=3)
    expected = [_alone(engine, p, m, ignore_eos=True) for p, m in zip(prompts, budgets, strict=True)]
    scheduler = Scheduler(engine).start()
    try:
        handles = [scheduler.submit(Request(p, m, ignore_eos=True)) for p, m in zip(prompts, budgets, strict=True)]
        results = [h.result(timeout=120).token_ids for h in handles]
    finally:
        scheduler.shutdown()
    assert results == expected
    assert scheduler.stats.shifts > 0


def test_long_prompts_are_prefilled_in_chunks_between_decode_steps_and_equal_alone(engine: Engine) -> None:
    """With a 16-slot prefill budget, prompts longer than 16 tokens are fed in chunks (a 70-token prompt: a first
    chunk of 6, then four of 16) while the other rows keep decoding; every request gives its tokens alone."""
    lengths, budgets = [9, 70, 5, 40, 17, 3, 33], [30, 12, 25, 9, 20, 40, 6]
    prompts = _prompts(lengths, seed=7)
    expected = [_alone(engine, p, m, ignore_eos=True) for p, m in zip(prompts, budgets, strict=True)]
    scheduler = Scheduler(engine, prefill_tokens=16).start()
    try:
        handles = [scheduler.submit(Request(p, m, ignore_eos=True)) for p, m in zip(prompts, budgets, strict=True)]
        results = [h.result(timeout=120) for h in handles]
    finally:
        scheduler.shutdown()
    assert [r.token_ids for r in results] == expected
    assert [r.prompt_tokens for r in results] == lengths
    stats = scheduler.stats
    chunks = sum(-(-n // 16) for n in lengths if n > 16)  # 5 + 3 + 2 + 3
    assert stats.prefills >= chunks + 1 and stats.prefill_tokens == sum(lengths)
    assert stats.prefill_slots == stats.prefill_tokens  # eager prefills pad nothing on the CPU


def test_a_long_prompt_cancelled_between_its_chunks_frees_the_scheduler(engine: Engine) -> None:
    scheduler = Scheduler(engine, prefill_tokens=2).start()
    reached, gate = threading.Event(), threading.Event()

    def hold(event) -> None:  # on the engine thread: stop it once the long prompt is between two chunks
        chunked = scheduler._chunked
        if chunked is not None and chunked.chosen is None and not reached.is_set():
            reached.set()
            gate.wait(60)

    try:
        short = _prompts([4])[0]
        running = scheduler.submit(Request(short, 60, ignore_eos=True), hold)
        long = scheduler.submit(Request(_prompts([100], seed=2)[0], 8, ignore_eos=True))
        assert reached.wait(60)
        assert scheduler.queue_depth == 1  # the chunked prompt waits for its row
        long.cancel()
        gate.set()
        result = long.result(timeout=60)
        assert result.finish_reason == "cancelled" and result.completion_tokens == 0
        assert scheduler.generate(Request(short, 5, ignore_eos=True), timeout=60).token_ids == _alone(
            engine, short, 5, ignore_eos=True
        )
        del running
    finally:
        gate.set()
        scheduler.shutdown()
    assert scheduler.queue_depth == 0 and scheduler.running == 0 and scheduler.stats.cancelled == 1


def test_stop_strings_and_eos_end_a_request_as_alone(engine: Engine, scheduler: Scheduler) -> None:
    prompts = _prompts([4, 10, 7])
    free = engine.generate_ids(prompts, 24, ignore_eos=True)
    stop = free.texts[1][5:7]  # a piece of row 1's text: it stops there
    eos = free.token_ids[0][6]  # row 0's seventh token, made the end of sequence
    assert eos not in free.token_ids[0][:6] and stop
    expected = engine.generate_ids(prompts, 24, stop=[stop])
    handles = [scheduler.submit(Request(p, 24, stop=[stop])) for p in prompts]
    results = [h.result(timeout=60) for h in handles]
    for result, text, ids, reason in zip(results, expected.texts, expected.token_ids, expected.finish_reasons,
                                         strict=True):  # fmt: skip
        assert (result.text, result.token_ids, result.finish_reason) == (text, ids, reason)
    assert results[1].finish_reason == "stop" and stop not in results[1].text

    scheduler.eos = {eos}
    try:
        result = scheduler.generate(Request(prompts[0], 24), timeout=60)
    finally:
        scheduler.eos = set(engine.eos_token_ids)
    assert result.token_ids == free.token_ids[0][:7] and result.finish_reason == "eos"
    assert result.text == engine.tokenizer.decode(free.token_ids[0][:6])
    assert result.completion_tokens == 7


def test_streamed_text_pieces_add_up_to_the_text(engine: Engine, scheduler: Scheduler) -> None:
    prompt = _prompts([9])[0]
    handle = scheduler.submit(Request(prompt, 30, ignore_eos=True, stop=["zzz-never"]))
    events = list(handle.events(timeout=60))
    assert len(events) == 30 and all(len(e.token_ids) == 1 for e in events)
    assert "".join(e.text for e in events) == engine.tokenizer.decode(_alone(engine, prompt, 30, ignore_eos=True))
    assert [e.finish_reason for e in events] == [None] * 29 + ["length"]
    assert all(a.time <= b.time for a, b in itertools.pairwise(events))


def test_seeded_sampling_reproduces_whatever_runs_beside_it(scheduler: Scheduler) -> None:
    prompt = _prompts([8])[0]
    sampled = Request(prompt, 20, temperature=1.0, top_p=0.95, top_k=50, seed=5, ignore_eos=True)
    alone = scheduler.generate(sampled, timeout=60).token_ids
    others = [scheduler.submit(Request(p, 25, temperature=0.8, ignore_eos=True)) for p in _prompts([3, 12, 5], 7)]
    beside = scheduler.generate(sampled, timeout=60).token_ids
    for handle in others:
        handle.result(timeout=60)
    assert beside == alone
    other_seed = Request(prompt, 20, temperature=1.0, top_p=0.95, top_k=50, seed=6, ignore_eos=True)
    assert scheduler.generate(other_seed, timeout=60).token_ids != alone


def test_top_k_1_and_a_tiny_top_p_sample_the_greedy_token(engine: Engine, scheduler: Scheduler) -> None:
    prompt = _prompts([6])[0]
    greedy = _alone(engine, prompt, 16, ignore_eos=True)
    for options in ({"top_k": 1}, {"top_p": 1e-6}):
        request = Request(prompt, 16, temperature=1.5, ignore_eos=True, seed=1, **options)
        assert scheduler.generate(request, timeout=60).token_ids == greedy


def test_logprobs_are_the_model_log_softmax(engine: Engine, scheduler: Scheduler) -> None:
    prompt = _prompts([7])[0]
    result = scheduler.generate(Request(prompt, 6, logprobs=3, ignore_eos=True), timeout=60)
    assert result.logprobs is not None and len(result.logprobs) == 6
    with torch.inference_mode():
        logits = Engine(trained_model("llama"), max_batch=1, max_seq_len=64).logits([prompt + result.token_ids[:-1]])
    table = torch.log_softmax(logits[0, len(prompt) - 1 :].float(), dim=-1)
    for position, entry in enumerate(result.logprobs):
        assert entry.token_id == result.token_ids[position]
        assert entry.logprob == pytest.approx(float(table[position, entry.token_id]), abs=1e-4)
        best = torch.topk(table[position], 3)
        assert [t for t, _ in entry.top] == best.indices.tolist()
        assert entry.top[0][0] == entry.token_id  # greedy: the chosen token is the most likely


def test_cancel_frees_the_row_and_the_others_go_on(engine: Engine, scheduler: Scheduler) -> None:
    prompts = _prompts([5, 9])
    expected = _alone(engine, prompts[1], 40, ignore_eos=True)
    started = threading.Event()
    events = []

    def on_event(event) -> None:
        events.append(event)
        started.set()

    long = scheduler.submit(Request(prompts[0], 100, ignore_eos=True), on_event)
    other = scheduler.submit(Request(prompts[1], 40, ignore_eos=True))
    assert started.wait(60)
    long.cancel()
    assert other.result(timeout=60).token_ids == expected
    deadline = time.monotonic() + 30
    while events[-1].finish_reason is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events[-1].finish_reason == "cancelled" and events[-1].completion_tokens < 100
    assert scheduler.running == 0 and scheduler.stats.cancelled >= 1


def test_bad_requests_are_refused_before_they_queue(scheduler: Scheduler) -> None:
    with pytest.raises(ContextLengthError, match="exceeds the context of 128 tokens"):
        scheduler.submit(Request(list(range(100)), 29))
    with pytest.raises(ConfigError, match="no tokens"):
        scheduler.submit(Request([], 4))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        scheduler.submit(Request([1, 10_000], 4))
    with pytest.raises(ConfigError, match="max_tokens"):
        scheduler.submit(Request([1, 2], 0))
    with pytest.raises(ConfigError, match="top_p"):
        scheduler.submit(Request([1, 2], 4, temperature=1.0, top_p=0.0))
    assert scheduler.queue_depth == 0 and scheduler.running == 0


def test_a_full_queue_and_a_closed_scheduler_refuse_requests(engine: Engine) -> None:
    scheduler = Scheduler(engine, max_queue=2)
    with pytest.raises(SchedulerClosedError):
        scheduler.submit(Request([1, 2], 4))  # not started
    scheduler.start()
    gate = threading.Event()
    blocker = scheduler.submit(Request([1, 2], 2), lambda event: gate.wait(60))  # holds the engine thread
    deadline = time.monotonic() + 30
    while scheduler.queue_depth and time.monotonic() < deadline:  # until the blocker has left the queue
        time.sleep(0.01)
    waiting = [scheduler.submit(Request([3, 4], 3)) for _ in range(2)]
    with pytest.raises(QueueFullError):
        scheduler.submit(Request([5, 6], 3))
    gate.set()
    assert [h.result(timeout=60).finish_reason for h in waiting] == ["length", "length"]
    del blocker
    scheduler.shutdown()
    with pytest.raises(SchedulerClosedError):
        scheduler.submit(Request([1, 2], 4))


def test_shutdown_lets_running_requests_finish_or_cancels_them(engine: Engine) -> None:
    scheduler = Scheduler(engine).start()
    done = scheduler.submit(Request(_prompts([5])[0], 10, ignore_eos=True))
    scheduler.shutdown()  # no timeout: it finishes
    assert done.result(timeout=1).finish_reason == "length"

    scheduler = Scheduler(engine).start()
    handles = [scheduler.submit(Request(p, 120, ignore_eos=True)) for p in _prompts([3, 4, 5, 6, 7, 2])]
    scheduler.shutdown(timeout=0.0)  # no time given: cancelled (two still waiting, four running)
    reasons = [h.result(timeout=1).finish_reason for h in handles]
    assert "cancelled" in reasons and set(reasons) <= {"cancelled", "length"}
    assert scheduler.running == 0 and scheduler.queue_depth == 0
