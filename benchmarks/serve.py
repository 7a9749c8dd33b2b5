"""Serving under load: ``bittern serve``'s continuous batching against static batching and transformers' own
continuous batching, on a 2B4T-shaped model (or a tiny one on the CPU).

The model is ``benchmarks/decode.py``'s: ``BitNetForCausalLM`` of the 2B4T shape (hidden 2560, intermediate 6912,
``--layers`` of 30 blocks, 20 heads, 5 KV heads, vocab 128256, relu², tied embeddings) with random ternary
projections, built from ``--seed`` in every process, so every row runs the same weights. Rows:

1. ``bittern-ternary``: the OpenAI-compatible server (``bittern.serve``: scheduler, continuous batching) on the
   TernaryLinear model, in a process of its own, driven over HTTP on 127.0.0.1 by streaming clients;
2. ``bittern-dense``: the same server with the projections as ``nn.Linear`` holding ``Wt * s`` (bf16 on a GPU):
   what it does with a bf16 checkpoint;
3. ``bittern-scheduler``: the server's scheduler driven in process (``Scheduler.submit``), no HTTP: what the
   engine's continuous batching gives without the HTTP layer sharing its process (and the GIL);
4. ``bittern-static``: static batching, the engine before the scheduler (``Engine.generate_ids``): waiting
   requests are taken as one batch (up to ``--max-batch``) that runs until its longest request ends; no HTTP
   (which favours it);
5. ``transformers-cb``: transformers' continuous batching (``model.continuous_batching_context_manager`` and
   ``add_request``, its serving path, with per-token timestamps) on the dense model (bf16 on a GPU); no HTTP.

The workload: for each concurrency ``C`` of ``--concurrency``, ``C`` closed-loop clients send ``--requests``
requests (default ``max(16, 4 C)``) back to back from one list (the same list for every row): prompts of random
tokens with lengths uniform in ``--prompt-lens``, greedy outputs of lengths uniform in ``--output-lens`` (EOS
ignored). Before each timed run the same concurrency runs ``C`` requests untimed (graph captures, warm-up).
Figures: output tokens/s (all requests' output tokens over the run's wall time), time to first token (send to
first token) and inter-token latency (between consecutive tokens of a request), p50 and p99. The servers run
without a tokenizer (token-id prompts), so no detokenization is measured; each streamed chunk is one token. Ratios
are throughput against rows 2, 4 and 5 at the same concurrency, and p99 inter-token latency against the ternary
server's median inter-token latency at concurrency 1 (its batch-1 step, plus HTTP).

    python benchmarks/serve.py [--layers 30] [--concurrency 1,8,32,64] [--json serve.json]
    python benchmarks/serve.py --device cpu --tiny --concurrency 1,4,8   # a small CPU run
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import inspect
import json
import math
import os
import platform
import queue
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import add_model_options, text_table

ROWS = ("bittern-ternary", "bittern-dense", "bittern-scheduler", "bittern-static", "transformers-cb")
SERVER_ROWS = ("bittern-ternary", "bittern-dense")
MODEL_NAME = "bench"
START_SECONDS = 900.0


@dataclass
class Outcome:
    """One request's timings (seconds, ``time.perf_counter``) and output tokens."""

    sent: float
    tokens: list[float] = field(default_factory=list)  # arrival time of each output token
    output_tokens: int = 0


def workload(args: argparse.Namespace, concurrency: int, vocab: int) -> list[tuple[list[int], int]]:
    """The request list of one concurrency: ``(prompt ids, output tokens)``, the same for every row."""
    rng = random.Random(args.seed * 1000 + concurrency)
    count = args.requests or max(16, 4 * concurrency)
    low_p, high_p = args.prompt_lens
    low_o, high_o = args.output_lens
    return [([rng.randrange(vocab) for _ in range(rng.randint(low_p, high_p))], rng.randint(low_o, high_o))
            for _ in range(count)]  # fmt: skip


def summarize(outcomes: list[Outcome], seconds: float) -> dict[str, Any]:
    """Throughput and latency percentiles of one run."""
    ttft = sorted(o.tokens[0] - o.sent for o in outcomes if o.tokens)
    itl = sorted(b - a for o in outcomes for a, b in zip(o.tokens, o.tokens[1:], strict=False))
    tokens = sum(o.output_tokens for o in outcomes)

    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

    return {
        "requests": len(outcomes),
        "output_tokens": tokens,
        "seconds": seconds,
        "output_tokens_per_s": tokens / seconds if seconds > 0 else None,
        "ttft_p50_ms": _ms(pct(ttft, 0.5)),
        "ttft_p99_ms": _ms(pct(ttft, 0.99)),
        "itl_p50_ms": _ms(pct(itl, 0.5)),
        "itl_p99_ms": _ms(pct(itl, 0.99)),
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1e3


# --- the model, in every process ----------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, dense: bool) -> torch.nn.Module:
    """decode.py's random ternary 2B4T-shaped model (or the tiny one); ``dense``: projections as ``nn.Linear``."""
    from decode import build_ternary_model, model_config

    import bittern

    device = torch.device(args.device)
    dtype = _dtype(args)
    config = model_config(argparse.Namespace(tiny=args.tiny, layers=args.layers))
    config.max_position_embeddings = max(config.max_position_embeddings, args.max_seq_len)
    model = build_ternary_model(config, device, dtype, args.seed)
    if dense:
        bittern.to_linear(model)
    return model


def _dtype(args: argparse.Namespace) -> torch.dtype:
    name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _engine(args: argparse.Namespace, model: torch.nn.Module):
    from bittern.engine import Engine

    return Engine(model, None, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                  cuda_graph=not args.no_cuda_graph, compile=not args.no_compile)  # fmt: skip


# --- rows 1-2: the server, and HTTP clients -----------------------------------------------------------------------


def child_server(args: argparse.Namespace) -> None:
    """Child process: serve the model on 127.0.0.1:``args.port`` until SIGTERM."""
    from bittern.serve import serve

    engine = _engine(args, build_model(args, dense=args.child == "bittern-dense"))
    serve(engine, host="127.0.0.1", port=args.port, served_model_name=MODEL_NAME, max_queue=4096,
          prefill_tokens=args.prefill_tokens, log_level="warning", shutdown_timeout=5)  # fmt: skip


async def _client_run(url: str, requests: list[tuple[list[int], int]], concurrency: int) -> tuple[list, float]:
    import httpx

    outcomes: list[Outcome] = []
    pending = iter(requests)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(3600.0)) as http:

        async def worker() -> None:
            for prompt, budget in pending:
                body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": budget, "temperature": 0,
                        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
                outcome = Outcome(time.perf_counter())
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        raise RuntimeError(f"the server answered {response.status_code}: {await response.aread()}")
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("choices"):
                            outcome.tokens.append(time.perf_counter())
                        elif chunk.get("usage"):
                            outcome.output_tokens = chunk["usage"]["completion_tokens"]
                if len(outcome.tokens) != outcome.output_tokens:  # the finishing chunk carries the last token
                    raise RuntimeError(f"{len(outcome.tokens)} chunks for {outcome.output_tokens} tokens")
                outcomes.append(outcome)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return outcomes, time.perf_counter() - started


def run_server_row(args: argparse.Namespace, row: str, workloads: dict[int, list]) -> list[dict[str, Any]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, __file__, *sys.argv[1:], "--child", row, "--port", str(port)]
    process = subprocess.Popen(command)
    results = []
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_health(url, process)
        for concurrency, requests in workloads.items():
            asyncio.run(_client_run(url, requests[:concurrency], concurrency))  # warm-up
            before = _scheduler_counters(url)
            outcomes, seconds = asyncio.run(_client_run(url, requests, concurrency))
            work = {k: v - before.get(k, 0) for k, v in _scheduler_counters(url).items()}
            results.append(_record(row, concurrency, summarize(outcomes, seconds), work))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return results


def _scheduler_counters(url: str) -> dict[str, float]:
    """The server's ``bittern_scheduler_*_total`` counters (:class:`bittern.engine.scheduler.SchedulerStats`)."""
    import httpx

    prefix, suffix = "bittern_scheduler_", "_total"
    counters = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith(prefix) and name.endswith(suffix):
            counters[name[len(prefix) : -len(suffix)]] = float(value)
    return counters


def _wait_for_health(url: str, process: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server process exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not start in time")


# --- rows 3-4: in-process closed loops ----------------------------------------------------------------------------


def _closed_loop(requests: list[tuple[list[int], int]], concurrency: int, submit) -> tuple[list[Outcome], float]:
    """``concurrency`` client threads send ``requests`` back to back through ``submit(prompt, budget, outcome)``,
    which blocks until the request is done and fills ``outcome``."""
    pending = queue.SimpleQueue()
    for item in requests:
        pending.put(item)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            try:
                prompt, budget = pending.get_nowait()
            except queue.Empty:
                return
            outcome = Outcome(time.perf_counter())
            submit(prompt, budget, outcome)
            with lock:
                outcomes.append(outcome)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, time.perf_counter() - started


class _StaticServer:
    """Static batching: one thread takes every waiting request (up to ``max_batch``) as a batch and runs it with
    ``Engine.generate_ids`` until the batch's longest request ends. A request's first token comes at the batch's
    prefill end; its tokens then come one decode step apart; its client is answered when the batch ends.

    With CUDA graphs the engine captures (and compiles) its decode step per batch size and its prefill per batch
    size and length bucket: a batch is padded with copies of its first prompt to the next power of two, and every
    such graph is captured before timing (:meth:`warm_up`), so that no timed batch waits for a capture."""

    GATHER_SECONDS = 0.002

    def __init__(self, engine) -> None:
        self.engine = engine
        self.sizes = [1 << i for i in range(engine.max_batch.bit_length()) if 1 << i < engine.max_batch]
        self.sizes.append(engine.max_batch)
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def warm_up(self, longest_prompt: int, longest_output: int) -> None:
        """Capture every graph a timed batch can use (with CUDA graphs; nothing otherwise)."""
        if not self.engine.cuda_graph:
            return
        from bittern.engine.prefill import bucket_length

        lengths = sorted({bucket_length(n, longest_output, self.engine.max_seq_len) or n
                          for n in range(1, longest_prompt + 1)})  # fmt: skip
        for size in self.sizes:
            for length in lengths:
                self.engine.generate_ids([[1] * length] * size, 2, ignore_eos=True)

    def submit(self, prompt: list[int], budget: int, outcome: Outcome) -> None:
        done = threading.Event()
        self.waiting.put((prompt, budget, outcome, done))
        done.wait()

    def _loop(self) -> None:
        while True:
            batch = [self.waiting.get()]
            deadline = time.perf_counter() + self.GATHER_SECONDS
            while len(batch) < self.engine.max_batch:
                try:
                    batch.append(self.waiting.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
            longest = max(budget for _, budget, _, _ in batch)
            prompts = [p for p, _, _, _ in batch]
            if self.engine.cuda_graph:
                size = next(n for n in self.sizes if n >= len(prompts))
                prompts += [prompts[0]] * (size - len(prompts))
            started = time.perf_counter()
            result = self.engine.generate_ids(prompts, longest, ignore_eos=True)
            step = result.decode_seconds / max(longest - 1, 1)
            first = started + result.prefill_seconds
            for _, budget, outcome, done in batch:
                outcome.tokens = [first + i * step for i in range(budget)]
                outcome.output_tokens = budget
                done.set()


def child_static(args: argparse.Namespace, workloads: dict[int, list]) -> list[dict[str, Any]]:
    server = _StaticServer(_engine(args, build_model(args, dense=False)))
    server.warm_up(args.prompt_lens[1], args.output_lens[1])
    results = []
    for concurrency, requests in workloads.items():
        _closed_loop(requests[:concurrency], concurrency, server.submit)
        outcomes, seconds = _closed_loop(requests, concurrency, server.submit)
        results.append(_record("bittern-static", concurrency, summarize(outcomes, seconds)))
    return results


def child_scheduler(args: argparse.Namespace, workloads: dict[int, list]) -> list[dict[str, Any]]:
    """The scheduler in process: each client thread submits a request and waits for its last event; token times
    are the events' (taken on the engine thread as each token reaches the host)."""
    from dataclasses import asdict

    from bittern.engine.scheduler import Request, Scheduler

    engine = _engine(args, build_model(args, dense=False))
    results = []
    for prefill in args.prefill_budgets:  # one scheduler per budget, on the same engine (its decode graphs kept)
        options = {} if prefill is None else {"prefill_tokens": prefill}
        scheduler = Scheduler(engine, max_queue=4096, **options)
        scheduler.warm_up(args.prompt_lens[1])
        scheduler.start()
        row = "bittern-scheduler" if len(args.prefill_budgets) == 1 else f"bittern-scheduler/{scheduler.prefill_tokens}"

        def submit(prompt: list[int], budget: int, outcome: Outcome, scheduler: Scheduler = scheduler) -> None:
            for event in scheduler.submit(Request(prompt, budget, ignore_eos=True)).events():
                if event.finish_reason == "error":
                    raise RuntimeError(f"the scheduler failed a request: {event.error}")
                outcome.tokens += [event.time] * len(event.token_ids)
                outcome.output_tokens = event.completion_tokens

        for concurrency, requests in workloads.items():
            _closed_loop(requests[:concurrency], concurrency, submit)
            before = asdict(scheduler.stats)
            outcomes, seconds = _closed_loop(requests, concurrency, submit)
            work = {k: v - before[k] for k, v in asdict(scheduler.stats).items()}
            results.append(_record(row, concurrency, summarize(outcomes, seconds), work))
        scheduler.shutdown()
    return results


def child_transformers(args: argparse.Namespace, workloads: dict[int, list]) -> list[dict[str, Any]]:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = build_model(args, dense=True)
    model.set_attn_implementation(args.hf_attn)
    generation = GenerationConfig(do_sample=False, max_new_tokens=args.output_lens[1], eos_token_id=-1,
                                  pad_token_id=0)  # fmt: skip
    options = {"max_requests_per_batch": args.max_batch}
    if "auto_switch_to_flash" in inspect.signature(ContinuousBatchingConfig).parameters:
        options["auto_switch_to_flash"] = False  # keep the attention named by --hf-attn (newer releases)
    cb = ContinuousBatchingConfig(**options)
    results = []
    with model.continuous_batching_context_manager(generation_config=generation, continuous_batching_config=cb,
                                                   block=True, timeout=30) as manager:  # fmt: skip
        waiters: dict[str, tuple[threading.Event, list]] = {}
        lock = threading.Lock()
        stop = threading.Event()

        def collect() -> None:
            while not stop.is_set():
                output = manager.get_result(timeout=0.1)
                if output is None or not output.is_finished():
                    continue
                with lock:
                    event, box = waiters.pop(output.request_id)
                box.append(output)
                event.set()

        collector = threading.Thread(target=collect, daemon=True)
        collector.start()

        def submit(prompt: list[int], budget: int, outcome: Outcome) -> None:
            event, box = threading.Event(), []
            with lock:
                request_id = manager.add_request(prompt, max_new_tokens=budget, record_timestamps=True)
                waiters[request_id] = (event, box)
            event.wait()
            output = box[0]
            if output.error:
                raise RuntimeError(f"transformers failed a request: {output.error}")
            outcome.tokens = list(output.timestamps or [])
            outcome.output_tokens = len(output.generated_tokens)

        for concurrency, requests in workloads.items():
            _closed_loop(requests[:concurrency], concurrency, submit)
            outcomes, seconds = _closed_loop(requests, concurrency, submit)
            results.append(_record("transformers-cb", concurrency, summarize(outcomes, seconds)))
        stop.set()
        collector.join()
    return results


def run_child_row(args: argparse.Namespace, row: str) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "result.json"
        command = [sys.executable, __file__, *sys.argv[1:], "--child", row, "--result", str(path)]
        subprocess.run(command, check=True)
        return json.loads(path.read_text())


def _record(
    row: str, concurrency: int, figures: dict[str, Any], work: dict[str, float] | None = None
) -> dict[str, Any]:
    """One table entry; ``work``: the scheduler's counters over the timed run (bittern's continuous rows)."""
    entry = {"row": row, "concurrency": concurrency, **figures}
    print(f"  {row:<17} C={concurrency:<3} {_fmt(entry['output_tokens_per_s'], '.1f')} tok/s, TTFT p50 "
          f"{_fmt(entry['ttft_p50_ms'], '.1f')} ms, ITL p50 {_fmt(entry['itl_p50_ms'], '.2f')} / p99 "
          f"{_fmt(entry['itl_p99_ms'], '.2f')} ms", flush=True)  # fmt: skip
    if work:
        entry["scheduler"] = work
        seconds = figures["seconds"]
        print(f"    engine thread: admitting {work['prefill_seconds'] / seconds:.0%} of the run "
              f"({work['prefills']:.0f} prefills, {work['prefill_tokens']:.0f} tokens in "
              f"{work['prefill_slots']:.0f} slots), waiting for tokens {work['wait_seconds'] / seconds:.0%}; "
              f"{work['decode_steps']:.0f} decode steps, "
              f"{work['decode_tokens'] / max(work['decode_rows'], 1):.0%} of their rows busy", flush=True)  # fmt: skip
        if work.get("decode_gpu_seconds"):
            print(f"    GPU: prefill {work['prefill_gpu_seconds'] / seconds:.0%}, decode "
                  f"{work['decode_gpu_seconds'] / seconds:.0%} of the run", flush=True)  # fmt: skip
    return entry


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else f"{value:{spec}}"


# --- report -------------------------------------------------------------------------------------------------------


def add_ratios(results: list[dict[str, Any]]) -> None:
    def find(row: str, concurrency: int) -> dict[str, Any] | None:
        return next((r for r in results if r["row"] == row and r["concurrency"] == concurrency), None)

    step = find("bittern-ternary", 1)
    for entry in results:
        for base in ("bittern-dense", "bittern-static", "transformers-cb"):
            ref = find(base, entry["concurrency"])
            ok = ref is not None and ref["output_tokens_per_s"] and entry["output_tokens_per_s"]
            entry[f"throughput_vs_{base}"] = entry["output_tokens_per_s"] / ref["output_tokens_per_s"] if ok else None
        ok = step is not None and step["itl_p50_ms"] and entry["itl_p99_ms"] is not None
        entry["itl_p99_vs_batch1_step"] = entry["itl_p99_ms"] / step["itl_p50_ms"] if ok else None


def format_table(results: list[dict[str, Any]]) -> str:
    header = ("row", "C", "req", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
              "vs dense", "vs static", "vs hf-cb", "ITL p99 / step")  # fmt: skip

    def ratio(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}x"

    body = [
        (r["row"], str(r["concurrency"]), str(r["requests"]), _fmt(r["output_tokens_per_s"], ".1f"),
         _fmt(r["ttft_p50_ms"], ".1f"), _fmt(r["ttft_p99_ms"], ".1f"), _fmt(r["itl_p50_ms"], ".2f"),
         _fmt(r["itl_p99_ms"], ".2f"), ratio(r["throughput_vs_bittern-dense"]),
         ratio(r["throughput_vs_bittern-static"]), ratio(r["throughput_vs_transformers-cb"]),
         ratio(r["itl_p99_vs_batch1_step"]))
        for r in results
    ]  # fmt: skip
    return text_table(header, body)


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": importlib.metadata.version("transformers"),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "cpu_threads": torch.get_num_threads()}  # fmt: skip
    return env


def _pair(text: str) -> tuple[int, int]:
    low, high = (int(v) for v in text.split(","))
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with 1 <= MIN <= MAX, not {text!r}")
    return low, high


def _budgets(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, not {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated client counts (default "
                        "1,8,32,64)")  # fmt: skip
    parser.add_argument("--requests", type=int, default=None, help="requests per concurrency (default max(16, 4C))")
    parser.add_argument("--prompt-lens", type=_pair, default=None, help="MIN,MAX prompt tokens (default 32,512; "
                        "--tiny 4,48)")  # fmt: skip
    parser.add_argument("--output-lens", type=_pair, default=None, help="MIN,MAX output tokens (default 16,256; "
                        "--tiny 4,32)")  # fmt: skip
    parser.add_argument("--max-batch", type=int, default=64, help="rows of the engines and of transformers' batches")
    parser.add_argument("--max-seq-len", type=int, default=None, help="KV cache slots per row (default: longest "
                        "prompt + output, x2 for the scheduler's room to shift)")  # fmt: skip
    parser.add_argument("--prefill-tokens", type=_budgets, default=[None], help="bittern's continuous rows: the "
                        "most slots one prefill forward computes (default: the scheduler's); the scheduler row "
                        "takes a comma-separated list and runs each budget on one engine, as rows "
                        "bittern-scheduler/N")  # fmt: skip
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--hf-attn", default="sdpa", help="transformers-cb attention (default sdpa; "
                        "flash_attention_2 where installed)")  # fmt: skip
    parser.add_argument("--no-cuda-graph", action="store_true", help="bittern rows: eager decode step and prefill")
    parser.add_argument("--no-compile", action="store_true", help="bittern rows: capture the step uncompiled")
    parser.add_argument("--json", help="write the report as JSON to this path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.prompt_lens = args.prompt_lens or ((4, 48) if args.tiny else (32, 512))
    args.output_lens = args.output_lens or ((4, 32) if args.tiny else (16, 256))
    if args.max_seq_len is None:
        args.max_seq_len = 2 * (args.prompt_lens[1] + args.output_lens[1])
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    args.row_list = rows
    args.prefill_budgets = args.prefill_tokens
    if len(args.prefill_budgets) > 1 and set(rows) & set(SERVER_ROWS):
        parser.error("several --prefill-tokens budgets apply to the bittern-scheduler row only")
    args.prefill_tokens = args.prefill_budgets[0]
    args.concurrency_list = [int(c) for c in args.concurrency.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    vocab = 256 if args.tiny else 128256
    workloads = {c: workload(args, c, vocab) for c in args.concurrency_list}
    if args.child in SERVER_ROWS:
        child_server(args)
        return
    if args.child is not None:
        run = {"bittern-scheduler": child_scheduler, "bittern-static": child_static}.get(args.child, child_transformers)
        Path(args.result).write_text(json.dumps(run(args, workloads)))
        os._exit(0)  # transformers' manager may leave threads behind
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for row in args.row_list:
        print(f"{row}:", flush=True)
        rows = run_server_row(args, row, workloads) if row in SERVER_ROWS else run_child_row(args, row)
        results += rows
    add_ratios(results)
    env = _environment(args)
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "port", "result")}
    report = {"environment": env, "settings": {**settings, "dtype": str(_dtype(args))}, "results": results,
              "seconds": time.perf_counter() - started}  # fmt: skip
    layers = 2 if args.tiny else args.layers
    shape = "tiny" if args.tiny else "2B4T"
    print(f"\n{env['device']}, torch {env['torch']}, transformers {env['transformers']}; {shape}"
          f" shape, {layers} layers, {report['settings']['dtype']}, prompts {args.prompt_lens}, outputs "
          f"{args.output_lens}, max batch {args.max_batch}; {report['seconds']:.0f} s in all\n")  # fmt: skip
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
