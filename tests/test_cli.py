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


def test_help_does_not_import_torch() -> None:
    """``bittern --help`` and every verb's help build without torch or transformers (lazy imports: 0.05 s instead of
    1.7 s)."""
    code = (
        "import sys, contextlib, io\n"
        "from bittern.cli import main\n"
        "for argv in ([], ['train'], ['generate'], ['convert'], ['export', 'gguf']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main([*argv, '--help'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_inspect_help_names_gguf_files(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    out = capsys.readouterr().out
    assert "checkpoint directory or .gguf file" in out


@pytest.mark.parametrize(
    ("argv", "target", "message"),
    [
        (["train", "--out", "RUN", "--preset", "tiny"], "bittern.train.train",
         "bittern: interrupted; run the same command again to resume from the last checkpoint"),
        (["demo", "--out", "D"], "bittern.demo.run_demo",
         "bittern: interrupted; run the same bittern demo command again to resume from the last checkpoint"),
        (["convert", "SRC", "DST", "--to", "packed"], "bittern.checkpoint.convert_checkpoint",
         "bittern: interrupted; nothing was written ('DST' is as it was)"),
        (["export", "gguf", "SRC", "OUT.gguf"], "bittern.export.export_gguf",
         "bittern: interrupted; nothing was written ('OUT.gguf' is as it was)"),
        (["generate", "M", "--prompt", "Hi"], "bittern.engine.load", "bittern: interrupted"),
    ],
)  # fmt: skip
def test_ctrl_c_ends_with_one_line_and_status_130(
    argv: list[str], target: str, message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(Path(__file__).parent)  # relative names that do not exist: nothing is written
    monkeypatch.setattr(target, interrupted)
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == message
    assert "Traceback" not in captured.out + captured.err


def test_console_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bittern.cli", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert result.stdout.startswith("bittern ")


def test_the_command_ignores_ctrl_c_once_the_verb_has_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from bittern import cli

    calls: list[tuple[int, object]] = []
    monkeypatch.setattr(cli, "main", lambda: calls.append(("main", None)) or 3)
    monkeypatch.setattr(signal, "signal", lambda number, handler: calls.append((number, handler)))
    with pytest.raises(SystemExit) as exited:
        cli.console_main()
    assert exited.value.code == 3  # the verb's status, whatever comes during the teardown
    assert calls == [("main", None), (signal.SIGINT, signal.SIG_IGN)]


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


def test_convert_packed_keeps_the_dtype_stored_in_the_source(full_precision_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    def dtype(directory: Path) -> str:
        with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
            return handle.get_slice("model.embed_tokens.weight").get_dtype()

    bf16_packed = tmp_path / "packed-bf16"
    assert main(["convert", str(full_precision_dir), str(bf16_packed), "--to", "packed", "--dtype", "bfloat16"]) == 0
    assert dtype(bf16_packed) == "BF16"
    again = tmp_path / "again"
    assert main(["convert", str(bf16_packed), str(again), "--to", "packed"]) == 0
    assert dtype(again) == "BF16"  # as stored in SRC, not float32
    assert main(["convert", str(bf16_packed), str(tmp_path / "f32"), "--to", "packed", "--dtype", "float32"]) == 0
    assert dtype(tmp_path / "f32") == "F32"  # unless told
    assert main(["convert", str(full_precision_dir), str(tmp_path / "plain"), "--to", "packed"]) == 0
    assert dtype(tmp_path / "plain") == "F32"


def test_convert_stores_a_chat_template(full_precision_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from bittern.tokenization import CHAT_TEMPLATES
    from bittern.train.corpus import pydoc_topics
    from bittern.train.tokenizer import train_bpe_tokenizer

    source = tmp_path / "src"
    assert main(["convert", str(full_precision_dir), str(source), "--to", "packed"]) == 0
    (source / "tokenizer_config.json").unlink()  # the fixture's placeholder: a real tokenizer instead
    train_bpe_tokenizer(pydoc_topics()[:4], 300).save_pretrained(source)
    out = tmp_path / "chat"
    assert main(["convert", str(source), str(out), "--to", "packed", "--chat-template", "plain"]) == 0
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATES["plain"]
    assert AutoTokenizer.from_pretrained(source).chat_template is None


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


@pytest.mark.parametrize("option", ["--include", "--exclude"])
def test_convert_names_the_option_of_a_bad_pattern(
    full_precision_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(full_precision_dir), str(out), "--to", "packed", option, "["]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bittern: error: {option} '[' is not a valid regular expression (") and err.count("\n") == 1
    assert "ConversionPolicy" not in err and not out.exists()


@pytest.mark.parametrize(
    ("to", "option"),
    [("bf16", ["--scale-convention", "multiply"]), ("prequantized", ["--scale-convention", "divide"]),
     ("bf16", ["--allow-padded-rows"])],
)  # fmt: skip
def test_convert_refuses_packed_only_options_for_other_variants(
    full_precision_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], to: str, option: list[str]
) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(full_precision_dir), str(out), "--to", to, *option]) == 2
    err = capsys.readouterr().err
    assert err == f"bittern: error: {option[0]} applies to --to packed only, not --to {to}\n"
    assert not out.exists()


def test_convert_refuses_existing_destination_without_overwrite(
    full_precision_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    assert main(["convert", str(full_precision_dir), str(out), "--to", "packed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists; pass --overwrite to replace it" in err[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["convert", str(full_precision_dir), str(out), "--to", "packed", "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_convert_overwrite_never_replaces_the_source_or_a_directory_holding_it(
    full_precision_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    variants = tmp_path / "run" / "variants"
    packed = variants / "packed"
    assert main(["convert", str(full_precision_dir), str(packed), "--to", "packed"]) == 0
    (variants / "beside.txt").write_text("another variant")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    for destination in (variants, tmp_path / "run", packed):
        assert main(["convert", str(packed), str(destination), "--to", "packed", "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "source" in err[0], err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert load_model(packed) is not None


def test_convert_refuses_layer_patterns_for_an_already_ternary_source(
    full_precision_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    packed = tmp_path / "packed"
    assert main(["convert", str(full_precision_dir), str(packed), "--to", "packed", "--include", "mlp"]) == 0
    capsys.readouterr()
    for option in ("--include", "--exclude"):
        assert main(["convert", str(packed), str(tmp_path / "again"), "--to", "bf16", option, "q_proj"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "already ternary" in err[0] and not (tmp_path / "again").exists()


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


def test_inspect_of_a_lora_adapter_says_to_inspect_the_base_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "runs/base/variants/packed"}))
    assert main(["inspect", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"bittern: error: file '{adapter}': is a LoRA adapter (adapter_config.json), not a model: inspect its base "
        f"model instead (its base: runs/base/variants/packed); the adapter's settings are in "
        f"{adapter / 'adapter_config.json'}\n"
    )
    assert "--adapter" not in err  # inspect has no such option


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


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--port", "-1"], "--port must lie in 0..65535 (0: any free port), got -1"),
        (["--port", "70000"], "--port must lie in 0..65535 (0: any free port), got 70000"),
        (["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
        (["--max-seq-len", "1"], "--max-seq-len must be at least 2, got 1"),
        (["--max-queue", "-3"], "--max-queue must be at least 1, got -3"),
        (["--prefill-tokens", "0"], "--prefill-tokens must be at least 1, got 0"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout must be a finite number of seconds >= 0, got -1.0"),
        (["--shutdown-timeout", "nan"], "--shutdown-timeout must be a finite number of seconds >= 0, got nan"),
    ],
)
def test_serve_options_are_checked_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, options, message
) -> None:
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("bittern.serve.server.load_engine", must_not_load)
    assert main(["serve", str(tmp_path / "model"), *options]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"bittern: error: {message}\n"


def test_serve_passes_its_scheduler_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    class StopError(Exception):
        pass

    def scheduler(engine, **limits):
        seen.update(limits)
        raise StopError

    monkeypatch.setattr("bittern.serve.server.load_engine", lambda model, **options: object())
    monkeypatch.setattr("bittern.serve.server.Scheduler", scheduler)
    with pytest.raises(StopError):
        main(["serve", str(tmp_path), "--max-queue", "7", "--prefill-tokens", "512"])
    assert seen == {"max_queue": 7, "prefill_tokens": 512}
    seen.clear()
    with pytest.raises(StopError):
        main(["serve", str(tmp_path)])
    assert seen == {}  # the scheduler's defaults
