"""Distributed training on torch's own engine: two gloo processes under torchrun, with DDP or FSDP2, train
exactly like one process with the same global batch (that the scale of a sharded weight is the whole
tensor's is proven layer by layer in test_sharded_scale.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_train_args

STEPS = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_args(out: Path, data: Path, batch_size: int) -> list[str]:
    return tiny_train_args(out, data, batch_size=batch_size, steps=STEPS, save_every=100)


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "ddp-loss-chunk"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(
    engine: str, text_dir: Path, tmp_path: Path
) -> None:
    """ddp-loss-chunk: both runs with --loss-chunk (the LM head runs after DDP's forward, and the loss is scaled
    as Trainer scales transformers' loss)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "bittern.cli"]
    extra = {"ddp": [], "fsdp2": ["--fsdp"], "ddp-loss-chunk": ["--loss-chunk", "24"]}[engine]
    args = _train_args(tmp_path / "ddp", text_dir, batch_size=2) + extra
    ddp = subprocess.run([*torchrun, *args], env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = [sys.executable, "-m", "bittern.cli", *_train_args(tmp_path / "single", text_dir, batch_size=4)]
    single += extra if engine == "ddp-loss-chunk" else []
    subprocess.run(single, env=env, check=True, capture_output=True)

    ddp_losses, single_losses = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert len(ddp_losses) == len(single_losses) == STEPS
    assert ddp_losses[-1] < ddp_losses[0]  # it trains
    # the same global batch of 4 sequences: 2 per rank, gradients averaged by DDP's all-reduce. The all-reduce
    # sums in another order than one backward, so latent weights differ in their last bits after a step, and a
    # weight lying on a rounding boundary of W/s can flip its ternary code: agreement to 1e-3, not bit-exact.
    assert ddp_losses == pytest.approx(single_losses, rel=1e-3)
    assert ddp.stdout.count("run finished") == 1  # rank 0 alone reports
