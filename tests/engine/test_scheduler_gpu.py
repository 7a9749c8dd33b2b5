"""Continuous batching on a CUDA GPU: graphed decode buckets and graphed prefill groups give the tokens a request
gives alone. Skipped without CUDA."""

from __future__ import annotations

import random

import pytest
import torch
from engine_models import synthetic_tokens, tokenizer, trained_model

from bittern.engine import Engine
from bittern.engine.scheduler import Request, Scheduler

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _alone(engine: Engine, prompts: list[list[int]], budgets: list[int]) -> list[list[int]]:
    """Each prompt's greedy tokens run alone through the engine."""
    return [engine.generate_ids([p], m, ignore_eos=True).token_ids[0] for p, m in zip(prompts, budgets, strict=True)]


def _scheduled(scheduler: Scheduler, prompts: list[list[int]], budgets: list[int]) -> list[list[int]]:
    """Start ``scheduler``, submit every prompt at once, and return their greedy tokens (then shut it down)."""
    scheduler.start()
    try:
        handles = [scheduler.submit(Request(p, m, ignore_eos=True)) for p, m in zip(prompts, budgets, strict=True)]
        return [h.result(timeout=300).token_ids for h in handles]
    finally:
        scheduler.shutdown()


@pytest.mark.parametrize("arch", ["llama", "bitnet"])
def test_graphed_scheduler_equals_alone_after_warm_up(arch: str) -> None:
    model = trained_model(arch).to(device="cuda", dtype=torch.float32)
    engine = Engine(model, tokenizer(), max_batch=5, max_seq_len=96, compile=False)
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(14)]
    budgets = [rng.randint(1, 96 - n) for n in lengths]
    rows = synthetic_tokens(len(lengths), max(lengths), seed=5)
    prompts = [rows[i, :n].tolist() for i, n in enumerate(lengths)]
    expected = _alone(engine, prompts, budgets)
    scheduler = Scheduler(engine, prefill_rows=4, prefill_tokens=128)
    scheduler.warm_up()
    captured = set(engine._decode_step().graphs)
    assert captured == set(scheduler.buckets) == {1, 2, 4, 5}
    prefills = set(scheduler._prefill.graphs)
    assert {rows for rows, _ in prefills} == {1, 2, 4}
    assert _scheduled(scheduler, prompts, budgets) == expected
    assert set(engine._decode_step().graphs) == captured  # nothing captured while serving
    assert set(scheduler._prefill.graphs) == prefills


def test_graphed_chunks_of_long_prompts_equal_alone() -> None:
    """A 16-slot prefill budget: prompts longer than 16 tokens are fed in graphed chunks (one graph for every chunk
    start, captured at warm-up) and give the tokens they give alone."""
    model = trained_model("bitnet").to(device="cuda", dtype=torch.float32)
    engine = Engine(model, tokenizer(), max_batch=4, max_seq_len=128, compile=False)
    lengths, budgets = [70, 9, 41, 17, 5, 100], [20, 30, 12, 25, 40, 9]
    rows = synthetic_tokens(len(lengths), max(lengths), seed=9)
    prompts = [rows[i, :n].tolist() for i, n in enumerate(lengths)]
    expected = _alone(engine, prompts, budgets)
    scheduler = Scheduler(engine, prefill_tokens=16)
    scheduler.warm_up()
    chunk_graphs = set(scheduler._prefill.chunk_graphs)
    assert chunk_graphs == {(1, 16)}
    assert _scheduled(scheduler, prompts, budgets) == expected
    assert set(scheduler._prefill.chunk_graphs) == chunk_graphs
    chunks = sum(-(-n // 16) for n in lengths if n > 16)  # 5 + 3 + 2 + 7
    assert scheduler.stats.prefills >= chunks + 1
