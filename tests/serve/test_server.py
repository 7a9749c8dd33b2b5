"""The OpenAI-compatible server (:mod:`bittern.serve`) on 127.0.0.1, through the official ``openai`` client: what it
answers equals what the engine generates alone, streamed or not; usage; every error status; a client that leaves
mid-stream frees its row; a bounded load test loses and corrupts nothing."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_helpers import running_server, synthetic_tokens, tokenizer, trained_model

from bittern.engine import Engine
from bittern.engine.scheduler import Request, Scheduler
from bittern.serve import create_app

pytestmark = pytest.mark.usefixtures("single_thread")

MODEL = "tiny-ternary"
KEY = "test-key"
MAX_SEQ_LEN = 256
MAX_QUEUE = 24


@pytest.fixture(scope="module")
def reference() -> Engine:
    """The same weights in an engine of its own: what each request gives alone."""
    return Engine(trained_model("llama"), tokenizer(), max_batch=1, max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def server():
    engine = Engine(trained_model("llama"), tokenizer(), max_batch=4, max_seq_len=MAX_SEQ_LEN)
    scheduler = Scheduler(engine, max_queue=MAX_QUEUE)
    app = create_app(scheduler, served_model_name=MODEL, api_key=KEY)
    with running_server(app) as url:
        yield url, scheduler, app


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=60)


def _prompt_ids(length: int, seed: int) -> list[int]:
    return synthetic_tokens(1, length, seed=seed)[0].tolist()


def _wait_until(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_completion_equals_the_engine_alone_with_usage(client: openai.OpenAI, reference: Engine) -> None:
    expected = reference.generate("The import statement", 12)
    answer = client.completions.create(model=MODEL, prompt="The import statement", max_tokens=12, temperature=0)
    assert answer.object == "text_completion" and answer.model == MODEL
    assert answer.choices[0].text == expected.text
    assert answer.choices[0].finish_reason == ("length" if expected.finish_reasons[0] == "length" else "stop")
    assert answer.usage.prompt_tokens == len(expected.prompt_token_ids[0])
    assert answer.usage.completion_tokens == len(expected.token_ids[0])
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_token_prompts_and_several_prompts(client: openai.OpenAI, reference: Engine) -> None:
    prompts = [_prompt_ids(7, 1), _prompt_ids(15, 2)]
    expected = [reference.generate_ids([p], 9, ignore_eos=True) for p in prompts]
    answer = client.completions.create(model=MODEL, prompt=prompts, max_tokens=9, temperature=0,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert [c.index for c in answer.choices] == [0, 1]
    assert [c.text for c in answer.choices] == [e.text for e in expected]
    assert answer.usage.prompt_tokens == 22 and answer.usage.completion_tokens == 18


def test_streamed_completion_equals_the_whole_one(client: openai.OpenAI, reference: Engine) -> None:
    expected = reference.generate_ids([_prompt_ids(10, 3)], 20, ignore_eos=True)
    stream = client.completions.create(model=MODEL, prompt=_prompt_ids(10, 3), max_tokens=20, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})  # fmt: skip
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1 and "".join(texts) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == 10


def test_chat_completion_streamed_and_not(client: openai.OpenAI, reference: Engine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a module?"}]
    expected = reference.chat(messages, 16)
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content == expected.text
    assert answer.usage.prompt_tokens == len(reference.chat_prompt(messages))
    assert answer.usage.completion_tokens == len(expected.token_ids[0])
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=16,
                                            temperature=0, stream=True)  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage is None


def test_stop_strings_end_the_text(client: openai.OpenAI, reference: Engine) -> None:
    free = reference.generate_ids([_prompt_ids(6, 4)], 24, ignore_eos=True).text
    stop = free[6:8]
    expected = reference.generate_ids([_prompt_ids(6, 4)], 24, ignore_eos=True, stop=[stop])
    for stream in (False, True):
        answer = client.completions.create(model=MODEL, prompt=_prompt_ids(6, 4), max_tokens=24, temperature=0,
                                           stop=[stop, "never-there"], stream=stream,
                                           extra_body={"ignore_eos": True})  # fmt: skip
        chunks = list(answer) if stream else [answer]
        assert "".join(c.choices[0].text for c in chunks) == expected.text == free[: free.find(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_and_logprobs(client: openai.OpenAI) -> None:
    options = dict(model=MODEL, prompt="A list is", max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    first = client.completions.create(**options).choices[0].text
    assert client.completions.create(**options).choices[0].text == first
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                            temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert all(item.logprob <= 0 and len(item.top_logprobs) == 2 for item in content)
    assert all(item.top_logprobs[0].logprob == item.logprob for item in content)  # greedy: the top one
    plain = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0, logprobs=1)
    assert len(plain.choices[0].logprobs.token_logprobs) == plain.usage.completion_tokens


def test_models_health_and_metrics(server, client: openai.OpenAI) -> None:
    url = server[0]
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    client.completions.create(model=MODEL, prompt="Metrics", max_tokens=3, temperature=0)
    text = httpx.get(f"{url}/metrics").text
    for name in ("bittern_requests_total", "bittern_prompt_tokens_total", "bittern_generation_tokens_total",
                 "bittern_queue_depth", "bittern_running_rows", "bittern_time_to_first_token_seconds_bucket",
                 "bittern_inter_token_latency_seconds_bucket"):  # fmt: skip
        assert f"\n{name}" in text
    assert 'bittern_requests_total{endpoint="/v1/completions",status="200"}' in text
    counters = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith("bittern_scheduler_")}  # fmt: skip
    for name in ("prefills", "prefill_tokens", "decode_steps", "decode_tokens"):
        assert counters[f"bittern_scheduler_{name}_total"] >= 1
    assert "bittern_scheduler_wait_seconds_total" in counters


def _error(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize(
    ("options", "status", "param", "code"),
    [
        ({"temperature": -1}, 400, "temperature", None),
        ({"top_p": 0}, 400, "top_p", None),
        ({"max_tokens": 0}, 400, "max_tokens", None),
        ({"n": 2}, 400, "n", None),
        ({"presence_penalty": 0.5}, 400, "presence_penalty", None),
        ({"max_tokens": MAX_SEQ_LEN}, 400, "prompt", "context_length_exceeded"),
        ({"model": "no-such-model"}, 404, "model", "model_not_found"),
        ({"prompt": [1, 2, 10**6]}, 400, "prompt", None),
    ],
)
def test_bad_completion_requests(client: openai.OpenAI, options: dict, status: int, param, code) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **options}
    error = _error(lambda: client.completions.create(**body))
    assert error.status_code == status
    assert error.body["param"] == param and error.body["code"] == code and error.body["message"]


def test_bad_chat_requests_keys_and_bodies(server, client: openai.OpenAI) -> None:
    url = server[0]
    long = [{"role": "user", "content": "word " * 400}]
    error = _error(lambda: client.chat.completions.create(model=MODEL, messages=long))
    assert error.status_code == 400 and error.body["code"] == "context_length_exceeded"
    error = _error(lambda: client.chat.completions.create(model=MODEL, messages=[]))
    assert error.status_code == 400 and error.body["param"] == "messages"
    error = _error(lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}]))
    assert error.status_code == 400
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    error = _error(lambda: wrong.completions.create(model=MODEL, prompt="Hi", max_tokens=2))
    assert error.status_code == 401 and error.body["code"] == "invalid_api_key"
    response = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400 and "error" in response.json()
    assert client.completions.create(model=MODEL, prompt="Still fine", max_tokens=2).usage.completion_tokens == 2


def test_a_full_queue_answers_429(server, client: openai.OpenAI) -> None:
    _, scheduler, _ = server
    gate = threading.Event()
    seen = []
    scheduler.submit(Request([1, 2], 2), lambda event: seen.append(gate.wait(60) and event))  # holds the thread
    try:
        assert _wait_until(lambda: scheduler.queue_depth == 0)
        queued = [scheduler.submit(Request([3, 4], 2)) for _ in range(MAX_QUEUE)]
        error = _error(lambda: client.completions.create(model=MODEL, prompt="Hi", max_tokens=2))
        assert error.status_code == 429 and error.body["code"] == "queue_full"
    finally:
        gate.set()
    assert all(h.result(timeout=60).finish_reason == "length" for h in queued)
    assert _wait_until(lambda: len(seen) == 2) and seen[-1].finish_reason == "length"
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_a_client_leaving_mid_stream_frees_its_row(server) -> None:
    url, scheduler, _ = server
    cancelled = scheduler.stats.cancelled
    body = {"model": MODEL, "prompt": "Leave early", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as response:  # fmt: skip
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    assert _wait_until(lambda: scheduler.stats.cancelled > cancelled and scheduler.running == 0)


def test_a_client_leaving_a_waiting_request_frees_its_row(server, monkeypatch: pytest.MonkeyPatch) -> None:
    url, scheduler, _ = server
    monkeypatch.setattr("bittern.serve.app.DISCONNECT_POLL_SECONDS", 0.05)
    real_step = scheduler.engine._decode_step

    class SlowStep:  # 20 ms a step: 250 tokens cannot finish before the client gives up, however fast the kernels
        def __init__(self) -> None:
            self.step = real_step()

        def __call__(self, *args):  # type: ignore[no-untyped-def]
            time.sleep(0.02)
            return self.step(*args)

        @property
        def last_argmax(self):  # type: ignore[no-untyped-def]
            return self.step.last_argmax

    monkeypatch.setattr(scheduler.engine, "_decode_step", SlowStep)
    cancelled = scheduler.stats.cancelled
    body = {"model": MODEL, "prompt": [5], "max_tokens": 250, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.2)
    assert _wait_until(lambda: scheduler.stats.cancelled > cancelled and scheduler.running == 0)
    metrics = httpx.get(f"{url}/metrics").text
    assert 'bittern_requests_total{endpoint="/v1/completions",status="499"} 1.0' in metrics


def test_concurrent_requests_of_different_lengths_equal_alone(client: openai.OpenAI, reference: Engine) -> None:
    rng = random.Random(1)
    jobs = [(_prompt_ids(rng.randint(2, 40), seed), rng.randint(1, 40), seed % 2 == 0) for seed in range(12)]
    expected = [reference.generate_ids([p], m, ignore_eos=True).text for p, m, _ in jobs]

    def run(job) -> str:
        prompt, budget, stream = job
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=budget, temperature=0,
                                           stream=stream, extra_body={"ignore_eos": True})  # fmt: skip
        return "".join(c.choices[0].text for c in answer) if stream else answer.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(run, jobs)) == expected


def test_load_200_requests_from_16_clients_lose_and_corrupt_nothing(server, reference: Engine) -> None:
    """200 requests (streamed and not; one in ten streams dropped by its client after the first chunk) from 16
    clients: every completed one equals its request alone, with its usage; afterwards no row or queue entry is
    left."""
    url, scheduler, _ = server
    rng = random.Random(2)
    kinds = [(_prompt_ids(rng.randint(1, 24), 100 + i), rng.randint(1, 12)) for i in range(20)]
    expected = [reference.generate_ids([p], m, ignore_eos=True).text for p, m in kinds]
    plan = [(rng.randrange(len(kinds)), rng.choice(["whole", "stream", "stream", "drop"])) for _ in range(200)]
    plan = [(kind, "stream" if how == "drop" and i % 2 else how) for i, (kind, how) in enumerate(plan)]
    clients = [openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120) for _ in range(16)]

    def run(index: int) -> tuple[str, int, int] | None:
        kind, how = plan[index]
        prompt, budget = kinds[kind]
        client = clients[index % 16]
        stream = how != "whole"
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=budget, temperature=0,
                                           stream=stream, stream_options={"include_usage": True} if stream else None,
                                           extra_body={"ignore_eos": True})  # fmt: skip
        if how == "drop":
            next(iter(answer))
            answer.close()
            return None
        chunks = list(answer) if stream else [answer]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        return text, chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(200)))
    completed = 0
    for (kind, how), result in zip(plan, results, strict=True):
        if how == "drop":
            continue
        assert result == (expected[kind], len(kinds[kind][0]), kinds[kind][1])
        completed += 1
    assert completed >= 170
    assert _wait_until(lambda: scheduler.running == 0 and scheduler.queue_depth == 0)
