"""engine.graphs.capture_graph on a GPU: the warm-up runs before the capture, and replays recompute the output
buffers from whatever the input buffers hold."""

from __future__ import annotations

import pytest
import torch

from bittern.engine.graphs import capture_graph

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_capture_graph_replays_on_new_inputs() -> None:
    x = torch.arange(8, dtype=torch.float32, device="cuda")
    calls: list[str] = []

    def run() -> torch.Tensor:
        calls.append("run")
        return x * 2 + 1

    graph, out = capture_graph(run, warm_up=lambda: calls.append("warm_up"), warm_up_runs=2)
    assert calls == ["warm_up", "run", "run", "run"]  # warm-up, two warm-up runs, the captured call
    x.copy_(torch.linspace(-1, 1, 8, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, x * 2 + 1)
    assert calls == ["warm_up", "run", "run", "run"]  # a replay does not call Python


def test_graphs_sharing_a_pool_keep_their_own_outputs_when_replayed_in_turn() -> None:
    pool = torch.cuda.graph_pool_handle()
    x = torch.ones(4, device="cuda")
    first, a = capture_graph(lambda: x + 1, pool=pool)
    second, b = capture_graph(lambda: x * 3, pool=pool)
    x.fill_(2)
    first.replay()
    torch.cuda.synchronize()
    assert torch.equal(a, torch.full((4,), 3.0, device="cuda"))
    second.replay()
    torch.cuda.synchronize()
    assert torch.equal(b, torch.full((4,), 6.0, device="cuda"))
