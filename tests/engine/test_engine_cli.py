"""``bittern generate`` and ``bittern chat`` through :func:`bittern.cli.main`, with piped stdin."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from engine_models import tokenizer, trained_model

import bittern
from bittern.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    tokenizer().save_pretrained(root / "tokenizer")
    return bittern.save_model(trained_model("llama"), root / "packed", "packed", tokenizer_source=root / "tokenizer")


def test_generate_streams_one_prompt(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(checkpoint), "--prompt", "The import", "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    expected = bittern.load(checkpoint).generate("The import", 12).text
    assert captured.out == f"The import{expected}\n"
    assert "tokens/s" in captured.err and "prompt tokens" in captured.err


def test_generate_a_batch_with_sampling_options(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options = ["--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "8"]
    args = ["generate", str(checkpoint), "--prompt", "One", "--prompt", "Two words", *options]
    assert main(args) == 0
    out = capsys.readouterr().out
    texts = (
        bittern.load(checkpoint).generate(["One", "Two words"], 8, temperature=0.7, top_k=5, top_p=0.9, seed=3).texts
    )
    assert out == f"One{texts[0]}\n{'-' * 40}\nTwo words{texts[1]}\n"


def test_generate_chat_mode_and_stop(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine = bittern.load(checkpoint)
    messages = [{"role": "user", "content": "Hello"}]
    reply = engine.chat(messages, 16).text
    stop = reply[4:6]
    args = ["generate", str(checkpoint), "--chat", "--prompt", "Hello", "--max-new-tokens", "16", "--stop", stop]
    assert main([*args, "--no-stream"]) == 0
    assert capsys.readouterr().out == reply[: reply.find(stop)] + "\n"


def test_chat_reads_turns_from_a_pipe_and_keeps_history(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\nWhat next?\n/exit\nnever read\n"))
    assert main(["chat", str(checkpoint), "--max-new-tokens", "10", "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    engine = bittern.load(checkpoint)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    first = engine.chat(history, 10).text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "What next?"}]
    second = engine.chat(history, 10).text
    assert out == f"{first}\n{second}\n"


def test_chat_reset_and_end_of_input(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/reset\nHello"))  # no newline at the end: EOF ends
    assert main(["chat", str(checkpoint), "--max-new-tokens", "6"]) == 0
    first = bittern.load(checkpoint).chat([{"role": "user", "content": "Hello"}], 6).text
    assert capsys.readouterr().out == f"{first}\n(history cleared)\n{first}\n"


def test_chat_without_a_template_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = tokenizer()
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "tokenizer")
    path = bittern.save_model(trained_model("llama"), tmp_path / "m", "packed", tokenizer_source=tmp_path / "tokenizer")
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main(["chat", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bittern: error:") and "no chat template" in err and err.count("\n") == 1


def test_help_explains_the_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    for verb, needle in (("generate", "CUDA graph"), ("chat", "/reset")):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        out = capsys.readouterr().out
        assert needle in out and "--temperature" in out and "--weights" in out
