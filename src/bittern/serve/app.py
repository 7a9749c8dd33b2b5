"""The OpenAI-compatible HTTP API over a :class:`~bittern.engine.scheduler.Scheduler` (FastAPI).

:func:`create_app` builds the application; :func:`bittern.serve.serve` runs it under uvicorn (``bittern serve``).
The asyncio side only parses, tokenizes and formats: every request is submitted to the scheduler's engine thread,
whose events come back to the event loop through ``loop.call_soon_threadsafe``. A request that fails validation is
answered with OpenAI's error JSON and never reaches the engine; a client that goes away (a closed stream, or a
dropped connection while a non-streaming request waits) cancels its requests, which frees their rows at the next
decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bittern.engine.engine import Engine
from bittern.engine.scheduler import (
    ContextLengthError,
    Event,
    QueueFullError,
    Scheduler,
    SchedulerClosedError,
    TokenLogprob,
)
from bittern.engine.scheduler import Request as EngineRequest
from bittern.errors import BitternError, ConfigError
from bittern.serve.metrics import Metrics
from bittern.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, _Sampling

DISCONNECT_POLL_SECONDS = 0.5
"""How often a waiting non-streaming request checks whether its client is still there."""

_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass
class _Choice:
    """What one prompt of a request produced, gathered from its events."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Dispatcher:
    """Hands the engine thread's events to one event loop in batches: a decode step's events for every request
    cost one wake-up of the loop (``call_soon_threadsafe``), not one per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, tuple[int, Event]]] = []
        self.scheduled = False

    def put(self, target: asyncio.Queue, item: tuple[int, Event]) -> None:
        """On the engine thread: queue ``item`` for ``target`` (an asyncio queue of the loop)."""
        with self.lock:
            self.items.append((target, item))
            if self.scheduled:
                return
            self.scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for target, item in items:
            target.put_nowait(item)


def _dispatcher(app: FastAPI) -> _Dispatcher:
    loop = asyncio.get_running_loop()
    current = getattr(app.state, "dispatcher", None)
    if current is None or current.loop is not loop:
        current = app.state.dispatcher = _Dispatcher(loop)
    return current


class _Job:
    """The scheduler requests of one HTTP request (one per prompt), their events delivered on the event loop."""

    def __init__(self, app: FastAPI, requests: list[EngineRequest]) -> None:
        self.scheduler: Scheduler = app.state.scheduler
        self.metrics: Metrics = app.state.metrics
        self.dispatcher = _dispatcher(app)
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.arrival = time.perf_counter()
        self.last: dict[int, float] = {}
        self.open = set(range(len(requests)))
        self.gone = False  # the client left before the answer was ready
        self.handles = []
        try:
            for index, request in enumerate(requests):
                self.handles.append(self.scheduler.submit(request, self._deliver(index)))
        except BaseException:
            self.cancel()
            raise

    def _deliver(self, index: int) -> Callable[[Event], None]:
        def deliver(event: Event) -> None:  # on the engine thread
            self.dispatcher.put(self.queue, (index, event))

        return deliver

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    def _record(self, index: int, event: Event) -> None:
        if event.token_ids:
            previous = self.last.get(index)
            if previous is None:
                self.metrics.ttft.observe(event.time - self.arrival)
            else:
                self.metrics.itl.observe(event.time - previous)
            self.last[index] = event.time
            self.metrics.generation_tokens.inc(len(event.token_ids))
        if event.finish_reason is not None:
            self.metrics.prompt_tokens.inc(event.prompt_tokens)
            self.metrics.duration.observe(event.time - self.arrival)

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, Event]]:
        """Every event of every prompt until all have finished. With ``request`` (non-streaming), the client's
        connection is checked while waiting; a client gone cancels the job and ends the iteration."""
        check = time.monotonic() + DISCONNECT_POLL_SECONDS
        while self.open:
            if request is None:
                index, event = await self.queue.get()
            else:
                try:
                    index, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_SECONDS)
                except TimeoutError:
                    index, event = -1, None
                if time.monotonic() >= check:  # every poll interval, whether events flow or not
                    check = time.monotonic() + DISCONNECT_POLL_SECONDS
                    if await request.is_disconnected():
                        self.cancel()
                        self.gone = True
                        return
                if event is None:
                    continue
            self._record(index, event)
            if event.finish_reason is not None:
                self.open.discard(index)
                if event.finish_reason == "error":
                    self.cancel()
                    raise APIError(500, f"the engine failed: {event.error}", code="engine_error")
            yield index, event


def _engine_error(error: BitternError, param: str) -> APIError:
    if isinstance(error, ContextLengthError):
        return APIError(400, str(error), param, "context_length_exceeded")
    if isinstance(error, QueueFullError):
        return APIError(429, str(error), code="queue_full")
    if isinstance(error, SchedulerClosedError):
        return APIError(503, str(error), code="shutting_down")
    return APIError(400, str(error), param)


def _usage(choices: list[_Choice]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(
    model: Engine | Scheduler,
    *,
    served_model_name: str = "bittern",
    api_key: str | None = None,
    max_queue: int | None = None,
    shutdown_timeout: float | None = None,
) -> FastAPI:
    """The OpenAI-compatible application for an engine (a :class:`Scheduler` is made for it) or a scheduler.

    Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streaming as server-sent events with
    ``stream: true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format). A stream
    sends one chunk per token, except while text is held back (an incomplete character, or what may be the start
    of a stop string); an engine without a tokenizer takes token-id prompts and streams one empty-text chunk per
    token.

    The app owns the scheduler's life: it is started with the app (uvicorn's lifespan startup) and shut down with
    it — waiting requests and running rows get up to ``shutdown_timeout`` seconds
    (None: as long as they need) to finish, the rest are cancelled.

    On a GPU, pass a scheduler on which :meth:`~bittern.engine.scheduler.Scheduler.warm_up` has run (as
    :func:`bittern.serve.serve` does) to capture every CUDA graph before the first request.

    Args:
        model: the engine (its ``max_batch`` rows are the batch) or a scheduler over one.
        served_model_name: the model id clients name in ``model``; another name is answered with 404.
        api_key: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>`` (401 otherwise).
        max_queue: for an engine, the scheduler's waiting queue (default
            :data:`~bittern.engine.scheduler.DEFAULT_MAX_QUEUE`); beyond it, requests are answered with 429.
        shutdown_timeout: see above.
    """
    if isinstance(model, Scheduler):
        scheduler = model
    elif isinstance(model, Engine):
        scheduler = Scheduler(model) if max_queue is None else Scheduler(model, max_queue=max_queue)
    else:
        raise ConfigError(f"create_app takes an Engine or a Scheduler, not {type(model).__name__}")
    engine = scheduler.engine
    text_known = engine.tokenizer is not None  # without a tokenizer, every token gets a (textless) stream chunk

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.shutdown, shutdown_timeout)

    app = FastAPI(title="bittern", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.metrics = metrics = Metrics(scheduler)
    app.state.served_model_name = served_model_name
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        endpoint = request.url.path
        metrics.requests.labels(endpoint, str(error.status)).inc()
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        return await api_error(request, APIError(400, message, param))

    async def authenticate(request: Request) -> None:
        """The ``/v1/*`` routes' dependency: the bearer key (a dependency, not an HTTP middleware, whose wrapping
        of the connection would hide a client's disconnection from the route)."""
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    v1 = {"dependencies": [Depends(authenticate)]}

    def check_model(body: _Sampling) -> None:
        if body.model != served_model_name:
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves "
                           f"'{served_model_name}'", "model", "model_not_found")  # fmt: skip
        body.check_unsupported()
        if not scheduler.alive:
            raise APIError(503, "the server is shutting down", code="shutting_down")

    def engine_request(body: _Sampling, prompt: list[int], max_tokens: int | None, logprobs: int | None,
                       param: str) -> EngineRequest:  # fmt: skip
        limit = engine.max_seq_len - len(prompt)
        if max_tokens is None and limit < 1:
            raise APIError(400, f"the prompt ({len(prompt)} tokens) fills the context of {engine.max_seq_len} "
                           "tokens", param, "context_length_exceeded")  # fmt: skip
        request = EngineRequest(
            prompt_ids=prompt,
            max_tokens=max_tokens if max_tokens is not None else limit,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=body.stops(),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
        )
        try:
            scheduler.check(request)
        except ContextLengthError as error:
            raise APIError(400, str(error), param, "context_length_exceeded") from error
        except ConfigError as error:
            raise APIError(400, str(error), param) from error
        return request

    def start(requests: list[EngineRequest], param: str) -> _Job:
        try:
            return _Job(app, requests)
        except BitternError as error:
            raise _engine_error(error, param) from error

    def token_text(token_id: int) -> str:
        tokenizer = engine.tokenizer
        return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)

    # --- routes ------------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        if not scheduler.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok", "running": scheduler.running, "waiting": scheduler.queue_depth})

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {"id": served_model_name, "object": "model", "created": created, "owned_by": "bittern",
                "max_model_len": engine.max_seq_len}  # fmt: skip

    @app.get("/v1/models", **v1)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", **v1)
    async def one_model(name: str) -> dict[str, Any]:
        if name != served_model_name:
            raise APIError(404, f"the model '{name}' does not exist", "model", "model_not_found")
        return model_card()

    @app.post("/v1/completions", **v1)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body)
        prompts = _completion_prompts(body.prompt, engine)
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        requests = [engine_request(body, p, max_tokens, body.logprobs, "prompt") for p in prompts]
        job = start(requests, "prompt")
        ident, stamp = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": ident, "object": "text_completion", "created": stamp, "model": served_model_name}

        def logprobs_json(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
            tokens = [token_text(e.token_id) for e in entries]
            offsets, position = [], offset
            for token in tokens:
                offsets.append(position)
                position += len(token)
            return {
                "tokens": tokens,
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{token_text(t): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets,
            }

        if body.stream:

            async def stream() -> AsyncIterator[str]:
                choices = [_Choice() for _ in prompts]
                offsets = [0] * len(prompts)
                try:
                    async for index, event in job.events():
                        choice = choices[index]
                        choice.prompt_tokens, choice.completion_tokens = event.prompt_tokens, event.completion_tokens
                        finish = _FINISH.get(event.finish_reason or "")
                        if not event.text and finish is None and not event.logprobs and text_known:
                            continue  # held back (a possible stop string) or an incomplete character
                        item = {"index": index, "text": event.text, "logprobs": None, "finish_reason": finish}
                        if body.logprobs is not None and event.logprobs:
                            item["logprobs"] = logprobs_json(event.logprobs, offsets[index])
                        offsets[index] += len(event.text)
                        yield _sse({**base, "choices": [item], "usage": None})
                    if body.include_usage:
                        yield _sse({**base, "choices": [], "usage": _usage(choices)})
                    yield _sse("[DONE]")
                    metrics.requests.labels("/v1/completions", "200").inc()
                except APIError as error:
                    yield _sse(error.body())
                    yield _sse("[DONE]")
                    metrics.requests.labels("/v1/completions", str(error.status)).inc()
                finally:
                    job.cancel()

            return StreamingResponse(stream(), media_type="text/event-stream")

        choices = await _gather(job, request, len(prompts))
        if job.gone:
            return _client_gone(metrics, "/v1/completions")
        metrics.requests.labels("/v1/completions", "200").inc()
        return {
            **base,
            "choices": [
                {
                    "index": index,
                    "text": "".join(c.text),
                    "logprobs": logprobs_json(c.logprobs, 0) if body.logprobs is not None else None,
                    "finish_reason": _FINISH.get(c.finish_reason or ""),
                }
                for index, c in enumerate(choices)
            ],
            "usage": _usage(choices),
        }

    @app.post("/v1/chat/completions", **v1)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body)
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
        try:
            prompt = engine.chat_prompt(messages)
        except BitternError as error:
            raise APIError(400, str(error), "messages") from error
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        job = start([engine_request(body, prompt, body.token_limit, logprobs, "messages")], "messages")
        ident, stamp = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": ident, "created": stamp, "model": served_model_name}

        def logprobs_json(entries: list[TokenLogprob]) -> dict[str, Any]:
            def item(token_id: int, logprob: float) -> dict[str, Any]:
                text = token_text(token_id)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

            return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                                for e in entries]}  # fmt: skip

        if body.stream:

            async def stream() -> AsyncIterator[str]:
                chunk = {**base, "object": "chat.completion.chunk"}
                choice = _Choice()
                try:
                    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}  # fmt: skip
                    yield _sse({**chunk, "choices": [first], "usage": None})
                    async for _, event in job.events():
                        choice.prompt_tokens, choice.completion_tokens = event.prompt_tokens, event.completion_tokens
                        finish = _FINISH.get(event.finish_reason or "")
                        if not event.text and finish is None and not event.logprobs and text_known:
                            continue
                        delta = {"content": event.text} if event.text else {}
                        item = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                        if body.logprobs and event.logprobs:
                            item["logprobs"] = logprobs_json(event.logprobs)
                        yield _sse({**chunk, "choices": [item], "usage": None})
                    if body.include_usage:
                        yield _sse({**chunk, "choices": [], "usage": _usage([choice])})
                    yield _sse("[DONE]")
                    metrics.requests.labels("/v1/chat/completions", "200").inc()
                except APIError as error:
                    yield _sse(error.body())
                    yield _sse("[DONE]")
                    metrics.requests.labels("/v1/chat/completions", str(error.status)).inc()
                finally:
                    job.cancel()

            return StreamingResponse(stream(), media_type="text/event-stream")

        (choice,) = await _gather(job, request, 1)
        if job.gone:
            return _client_gone(metrics, "/v1/chat/completions")
        metrics.requests.labels("/v1/chat/completions", "200").inc()
        return {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(choice.text)},
                    "logprobs": logprobs_json(choice.logprobs) if body.logprobs else None,
                    "finish_reason": _FINISH.get(choice.finish_reason or ""),
                }
            ],
            "usage": _usage([choice]),
        }

    return app


def _client_gone(metrics: Metrics, endpoint: str) -> Response:
    """The answer to a client that left (nobody reads it): nginx's 499, counted as such."""
    metrics.requests.labels(endpoint, "499").inc()
    return Response(status_code=499)


async def _gather(job: _Job, request: Request, count: int) -> list[_Choice]:
    """Every prompt's output of a non-streaming job (partial, the job cancelled and ``job.gone`` set, if the client
    leaves)."""
    choices = [_Choice() for _ in range(count)]
    try:
        async for index, event in job.events(request):
            choice = choices[index]
            choice.text.append(event.text)
            choice.token_ids += event.token_ids
            choice.logprobs += event.logprobs or []
            choice.prompt_tokens, choice.completion_tokens = event.prompt_tokens, event.completion_tokens
            if event.finish_reason is not None:
                choice.finish_reason = event.finish_reason
    finally:
        job.cancel()
    return choices


def _completion_prompts(prompt: str | list[str] | list[int] | list[list[int]], engine: Engine) -> list[list[int]]:
    """The token ids of each prompt of a completions request (text through the tokenizer, BOS included if it adds
    one)."""
    if isinstance(prompt, str):
        texts: list[str] | None = [prompt]
    elif prompt and all(isinstance(p, str) for p in prompt):
        texts = [str(p) for p in prompt]
    else:
        texts = None
    if texts is not None:
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", "prompt")
        return engine.encode(texts)
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [[int(p) for p in prompt]]  # type: ignore[union-attr]
    return [[int(t) for t in p] for p in prompt]  # type: ignore[union-attr]
