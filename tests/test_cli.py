"""The ``bittern`` command line: convert, inspect, demo, help texts and error handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, token_batch

from bittern.checkpoint import load_model
from bittern.cli import main
from bittern.convert import to_bitlinear, to_ternary
from bittern.nn import TernaryLinear


@pytest.fixture(scope="module")
def full_precision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain float32 Llama saved by transformers, with a (fake) tokenizer file beside it."""
    directory = tmp_path_factory.mktemp("fp") / "llama"
    tiny_model("llama").save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    return directory


def test_help_of_every_verb_explains_it(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, needle in (
        ([], "convert"),
        (["convert"], "--scale-convention"),
        (["inspect"], "bits per linear weight"),
        (["demo"], "unigram"),
        (["train"], "kill -9"),
        (["eval"], "--stride"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--help"])
        assert exit_info.value.code == 0
        assert needle in capsys.readouterr().out


def test_console_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bittern.cli", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert result.stdout.startswith("bittern ")


def test_convert_full_precision_to_every_variant(
    full_precision_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = tiny_model("llama")
    to_bitlinear(reference)
    to_ternary(reference)
    ids = token_batch()
    with torch.no_grad():
        expected = reference(ids).logits
    for variant in ("packed", "bf16", "prequantized"):
        out = tmp_path / variant
        assert main(["convert", str(full_precision_dir), str(out), "--to", variant]) == 0
        assert (out / "tokenizer_config.json").is_file()
        model = load_model(out, layers="ternary")
        with torch.no_grad():
            logits = model(ids).logits
        relative = ((logits - expected).norm() / expected.norm()).item()
        # bf16 rounds the dense tensors and the scales; the others are float32 throughout
        assert relative <= (2e-2 if variant == "bf16" else 1e-4), (variant, relative)
    assert "wrote prequantized checkpoint" in capsys.readouterr().out


def test_convert_include_exclude_patterns(full_precision_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mlp-only"
    code = main(
        ["convert", str(full_precision_dir), str(out), "--to", "packed", "--include", r"\.mlp\.", "--exclude", "down"]
    )
    assert code == 0
    model = load_model(out)
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["model.layers.0.mlp.up_proj"] is TernaryLinear
    assert kinds["model.layers.0.mlp.down_proj"] is torch.nn.Linear
    assert kinds["model.layers.0.self_attn.q_proj"] is torch.nn.Linear
    config = json.loads((out / "config.json").read_text())
    assert "model.layers.0.mlp.down_proj" in config["quantization_config"]["modules_to_not_convert"]


def test_convert_refuses_existing_destination_without_overwrite(
    full_precision_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    assert main(["convert", str(full_precision_dir), str(out), "--to", "packed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["convert", str(full_precision_dir), str(out), "--to", "packed", "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_inspect_reports_packed_checkpoint(full_precision_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "packed"
    assert main(["convert", str(full_precision_dir), str(out), "--to", "packed"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "packed"
    assert report["layout"] == "bittern-packed"
    assert report["architecture"] == "LlamaForCausalLM"
    assert report["ternary_layers"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    # per layer: q, o 64x64; k, v 32x64 (2 KV heads x 16); gate, up 128x64; down 64x128
    linear_weights = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)
    assert report["ternary_weights"] == linear_weights
    # 2 bits per code + one float32 scale per layer
    assert report["bits_per_linear_weight"] == pytest.approx(2 + 14 * 32 / linear_weights)
    assert report["scale_convention"] == "divide"
    assert report["file_bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bits per linear weight" in text and "validation:" in text


def test_inspect_corrupt_checkpoint_gives_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0] and "JSON" in err[0]


@pytest.mark.slow
def test_demo_trains_exports_and_beats_the_unigram_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "150", "--quiet"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("model ") :].splitlines()
    rows = {line.split()[0]: line.split() for line in table[2:6]}
    assert set(rows) == {"packed", "bf16", "prequantized", "unigram"}
    perplexity = {name: float(row[-1]) for name, row in rows.items()}
    assert float(rows["packed"][3]) == pytest.approx(2.0, abs=0.01)  # bits per linear weight
    # the packed model and the latent (prequantized) one compute the same integer products; packed stores
    # 1/s (the Falcon-E convention, 1 ulp) and its embeddings in bf16
    assert perplexity["packed"] == pytest.approx(perplexity["prequantized"], rel=0.01)
    assert perplexity["bf16"] == pytest.approx(perplexity["packed"], rel=0.05)  # no activation quantization
    assert perplexity["packed"] < 0.9 * perplexity["unigram"]
    assert "sample from the reloaded packed model" in out
    run = tmp_path / "demo" / "run"
    assert (run / "report.md").exists() and (run / "curves.png").stat().st_size > 10_000
    assert sorted(p.name for p in (run / "variants").iterdir()) == ["bf16", "packed", "prequantized"]
