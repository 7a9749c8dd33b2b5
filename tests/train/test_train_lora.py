"""``bittern train --lora-rank`` end to end on CPU: adapters on a frozen packed base, adapter + merged + healed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_model

import bittern
from bittern.cli import main
from bittern.errors import ConfigError
from bittern.nn import TernaryLinear
from bittern.train import TrainConfig, train
from bittern.train.callbacks import read_metrics
from bittern.train.corpus import pydoc_topics
from bittern.train.tokenizer import train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def packed_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny packed ternary Llama with a locally trained tokenizer (a stand-in for a trained ternary model)."""
    directory = tmp_path_factory.mktemp("base")
    tokenizer = train_bpe_tokenizer(pydoc_topics()[:12], 300)
    tokenizer.save_pretrained(directory / "tokenizer")
    model = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=1)
    bittern.to_ternary(model)
    return bittern.save_model(model, directory / "packed", "packed", tokenizer_source=directory / "tokenizer")


def _digest(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def test_lora_run_trains_adapters_and_writes_adapter_merged_and_healed(
    packed_base: Path, text_dir: Path, tmp_path: Path
) -> None:
    before = _digest(packed_base)
    out = tmp_path / "lora"
    argv = ["train", "--out", str(out), "--model", str(packed_base), "--data", str(text_dir)]
    argv += ["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "q_proj,v_proj,down_proj"]
    argv += ["--seq-len", "32", "--batch-size", "4", "--steps", "16", "--lr", "1e-2", "--log-every", "1"]
    argv += [
        "--eval-tokens",
        "2048",
        "--lora-heal-steps",
        "3",
        "--lora-heal-lr",
        "1e-3",
        "--lora-merge-rounding",
        "stochastic",
        "--quiet",
    ]
    assert main(argv) == 0
    assert _digest(packed_base) == before  # the base checkpoint is read, never written
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 16
    assert sum(losses[-4:]) < sum(losses[:4])
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    for variant in ("merged", "merged-healed"):
        model = bittern.load_model(out / "variants" / variant)
        layers = [m for m in model.modules() if isinstance(m, TernaryLinear)]
        assert len(layers) == 7
        assert all(set(m.codes().unique().tolist()) <= {-1, 0, 1} for m in layers)
    report = (out / "report.md").read_text()
    for row in ("| base", "| adapter", "| merged (", "| merged-healed"):
        assert row in report
    assert "LoRA: rank 4, alpha 8" in report


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"model": "m", "lora_alpha": 8.0}, "--lora-alpha need --lora-rank"),
        ({"model": "m", "lora_targets": ["q_proj"]}, "--lora-targets need --lora-rank"),
        ({"model": "m", "lora_rank": 0}, "--lora-rank must be a positive integer"),
        ({"preset": "tiny", "lora_rank": 8}, "give --model"),
        ({"model": "m", "lora_rank": 8, "lora_dropout": 1.0}, "--lora-dropout"),
        ({"model": "m", "lora_rank": 8, "lora_heal_steps": -1}, "--lora-heal-steps"),
        ({"model": "m", "lora_rank": 8, "lambda_schedule": "linear"}, "--lambda-schedule does not apply"),
        ({"model": "m", "lora_rank": 8, "fsdp": True}, "--fsdp does not apply"),
        ({"model": "m", "lora_rank": 8, "lora_merge_rounding": "up"}, "--lora-merge-rounding"),
    ],
)
def test_bad_lora_settings_are_refused_naming_the_option(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(out="run", **settings).validate()


def test_unknown_target_module_is_refused_before_training(packed_base: Path, text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = TrainConfig(out=str(out), model=str(packed_base), data=[str(text_dir)], lora_rank=2,
                         lora_targets=["qkv_proj"], seq_len=32, steps=2, progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="'qkv_proj' matches no module"):
        train(config)
    assert not (out / "run_config.json").exists()  # the corrected command can run in the same directory


def test_an_interrupted_lora_run_resumes_with_the_same_losses(
    packed_base: Path, text_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "resume"
    argv = ["train", "--out", str(out), "--model", str(packed_base), "--data", str(text_dir), "--lora-rank", "4"]
    argv += ["--lora-dropout", "0.1", "--seq-len", "32", "--batch-size", "4", "--steps", "8", "--save-every", "4"]
    argv += ["--lr", "1e-2", "--log-every", "1", "--no-export", "--quiet"]
    assert main(argv) == 0
    uninterrupted = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}
    shutil.rmtree(out / "checkpoints" / "checkpoint-8")  # as if killed between the two checkpoints
    assert main(argv) == 0
    resumed = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}
    assert len(uninterrupted) == 8
    assert resumed == uninterrupted


def test_lora_with_a_chunked_loss_trains_like_transformers_loss(
    packed_base: Path, text_dir: Path, tmp_path: Path
) -> None:
    """--loss-chunk through the PeftModel (frozen packed base and head): the same losses, the base untouched."""
    losses = {}
    for chunk in ("0", "24"):
        out = tmp_path / f"chunk{chunk}"
        argv = ["train", "--out", str(out), "--model", str(packed_base), "--data", str(text_dir), "--lora-rank", "4"]
        argv += ["--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--steps", "5", "--lr", "1e-2"]
        argv += ["--log-every", "1", "--loss-chunk", chunk, "--no-export", "--quiet"]
        assert main(argv) == 0
        losses[chunk] = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses["24"]) == 5
    assert losses["24"] == pytest.approx(losses["0"], rel=1e-4)
