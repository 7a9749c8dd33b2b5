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
    # piped: each turn echoed, a blank line between one reply and the next turn (replies may hold newlines)
    assert out == f"> Hello\n{first}\n\n> What next?\n{second}\n"


def test_chat_reset_and_end_of_input(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/reset\nHello"))  # no newline at the end: EOF ends
    assert main(["chat", str(checkpoint), "--max-new-tokens", "6"]) == 0
    first = bittern.load(checkpoint).chat([{"role": "user", "content": "Hello"}], 6).text
    assert capsys.readouterr().out == f"> Hello\n{first}\n(history cleared)\n\n> Hello\n{first}\n"


def test_chat_refuses_a_turn_that_does_not_fit_and_goes_on(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    long_turn = "The import statement " * 200
    monkeypatch.setattr("sys.stdin", io.StringIO(f"Hello\n{long_turn}\nWhat next?\n"))
    assert main(["chat", str(checkpoint), "--max-new-tokens", "6", "--max-seq-len", "96"]) == 0
    captured = capsys.readouterr()
    engine = bittern.load(checkpoint, max_seq_len=96)
    history = [{"role": "user", "content": "Hello"}]
    first = engine.chat(history, 6).text
    turn_tokens = len(engine.tokenizer(long_turn.strip(), add_special_tokens=False)["input_ids"])
    prompt_tokens = len(engine.chat_prompt([*history, {"role": "assistant", "content": first},
                                            {"role": "user", "content": long_turn.strip()}]))  # fmt: skip
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "What next?"}]
    second = engine.chat(history, 6).text  # the refused turn is not in the history
    refusal = (
        f"(turn not sent: it is {turn_tokens:,} tokens and with the conversation so far, the prompt would be "
        f"{prompt_tokens:,}; at most 90 fit (max_seq_len 96 minus 6 new tokens): shorten the turn, or /reset the "
        "history)"
    )
    preview = f"{long_turn[:200]}… ({len(long_turn.strip()):,} characters)"
    assert captured.out == f"> Hello\n{first}\n\n> {preview}\n{refusal}\n\n> What next?\n{second}\n"
    assert captured.err == "" and "prompt 0" not in captured.out


def _without_chat_template(tmp_path: Path) -> Path:
    """A packed model whose tokenizer has no chat template."""
    plain = tokenizer()
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "tokenizer")
    return bittern.save_model(trained_model("llama"), tmp_path / "m", "packed", tokenizer_source=tmp_path / "tokenizer")


def test_chat_without_a_template_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _without_chat_template(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main(["chat", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bittern: error:") and "no chat template" in err and err.count("\n") == 1
    assert "--chat-template plain" in err  # says how to give one


def test_chat_template_option_on_a_model_without_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bittern.tokenization import set_chat_template

    path = _without_chat_template(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main(["chat", str(path), "--chat-template", "plain", "--max-new-tokens", "6"]) == 0
    engine = bittern.load(path)
    set_chat_template(engine.tokenizer, "plain")
    reply = engine.chat([{"role": "user", "content": "Hello"}], 6).text
    assert capsys.readouterr().out == f"> Hello\n{reply}\n"
    args = ["generate", str(path), "--chat", "--chat-template", "plain", "--prompt", "Hello", "--max-new-tokens", "6"]
    assert main([*args, "--no-stream"]) == 0
    assert capsys.readouterr().out == reply + "\n"


def test_an_unknown_chat_template_is_refused_before_the_model_loads(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bittern.engine.load", _must_not_load)
    assert main(["chat", str(checkpoint), "--chat-template", "no-such-template"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--chat-template 'no-such-template'" in err and "plain, chatml" in err


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the options were checked")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "1.5"], "top_p must lie in (0, 1]"),
        (["--top-k", "-2"], "top_k must be a non-negative integer"),
        (["--repetition-penalty", "0"], "repetition_penalty must be > 0"),
        (["--chat-template", "plain"], "--chat-template applies to chat prompts"),
        (["--adapter", "no-such-adapter"], "file 'no-such-adapter': --adapter: the directory does not exist"),
        (["--adapter", "a_dir"], "file 'a_dir': --adapter: not a LoRA adapter directory (no adapter_config.json)"),
        (["--adapter", "a_file"], "file 'a_file': --adapter: is a file, not a LoRA adapter directory"),
    ],
)
def test_options_are_checked_before_the_model_loads_or_the_prompt_is_echoed(
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    options,
    message,
) -> None:
    monkeypatch.setattr("bittern.engine.load", _must_not_load)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("not an adapter\n", encoding="utf-8")
    assert main(["generate", str(checkpoint), "--prompt", "The import statement", *options]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("bittern: error:") and message in captured.err and captured.err.count("\n") == 1


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_max_new_tokens_must_be_positive(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setattr("bittern.engine.load", _must_not_load)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(checkpoint), "--prompt", "Hi", "--max-new-tokens", value])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--max-new-tokens" in captured.err


def test_a_too_long_prompt_is_refused_before_it_is_echoed(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long_prompt = "The import statement " * 400
    assert main(["generate", str(checkpoint), "--prompt", long_prompt, "--max-seq-len", "64"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "plus max_new_tokens (128) exceeds max_seq_len (64)" in captured.err and captured.err.count("\n") == 1


def test_generate_and_chat_read_a_gguf_file_with_its_tokenizer(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("gguf")
    from bittern.export import export_gguf

    with pytest.warns(UserWarning):  # hidden 64: the rows fall back to Q8_0
        path = export_gguf(checkpoint, tmp_path / "m.gguf").path
    engine = bittern.load(path)
    assert engine.tokenizer is not None
    assert engine.encode("The import") == bittern.load(checkpoint).encode("The import")
    expected = engine.generate("The import", 12).text
    assert main(["generate", str(path), "--prompt", "The import", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == f"The import{expected}\n"
    reply = engine.chat([{"role": "user", "content": "Hello"}], 6).text  # the chat template travels in the file
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main(["chat", str(path), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == f"> Hello\n{reply}\n"


@pytest.mark.parametrize("verb", ["generate", "chat", "eval", "serve"])
def test_a_truncated_gguf_file_is_named_before_its_tokenizer_is_read(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, verb: str
) -> None:
    pytest.importorskip("gguf")
    from bittern.export import export_gguf

    with pytest.warns(UserWarning):  # hidden 64: the rows fall back to Q8_0
        data = export_gguf(checkpoint, tmp_path / "m.gguf").path.read_bytes()
    text = tmp_path / "eval.txt"
    text.write_text("The import statement\n", encoding="utf-8")
    options = {"generate": ["--prompt", "Hi"], "chat": [], "eval": ["--data", str(text)], "serve": []}[verb]
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    # cut inside the metadata (transformers' reader raised struct.error) and inside the tensor data (numpy's
    # "cannot reshape array" came back as the tokenizer's error)
    for size in (100, len(data) // 2):
        truncated = tmp_path / f"cut{size}.gguf"
        truncated.write_bytes(data[:size])
        assert main([verb, str(truncated), *options]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1
        assert f"file '{truncated}': not a readable GGUF file: truncated or corrupt ({size:,} bytes" in captured.err
        assert "tokenizer" not in captured.err and "reshape" not in captured.err


@pytest.fixture(scope="module")
def adapter(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the packed checkpoint, with non-zero B so that it changes the output."""
    import torch

    from bittern.peft import apply_lora

    peft_model = apply_lora(bittern.load_model(checkpoint), rank=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    directory = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(directory)
    return directory


def test_generate_runs_base_plus_adapter(checkpoint: Path, adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bittern.engine import Engine
    from bittern.peft import load_adapter

    peft_model = load_adapter(bittern.load_model(checkpoint, layers="ternary"), adapter)
    expected = Engine(peft_model.get_base_model(), bittern.load(checkpoint).tokenizer).generate("The import", 12).text
    assert expected != bittern.load(checkpoint).generate("The import", 12).text  # the adapter matters
    assert main(["generate", str(checkpoint), "--adapter", str(adapter), "--prompt", "The import",
                 "--max-new-tokens", "12"]) == 0  # fmt: skip
    assert capsys.readouterr().out == f"The import{expected}\n"


def test_an_adapter_given_as_the_model_is_named_as_one(
    adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", str(adapter), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a LoRA adapter" in err and f"--adapter {adapter}" in err
    for command in (["convert", str(adapter), str(tmp_path / "out"), "--to", "bf16"],
                    ["export", "gguf", str(adapter), str(tmp_path / "out.gguf")]):  # fmt: skip
        assert main(command) == 2  # verbs without --adapter point at the merged model
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "variants/merged" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.gguf").exists()


def test_help_explains_the_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    for verb, needle in (("generate", "CUDA graph"), ("chat", "/reset")):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        out = capsys.readouterr().out
        assert needle in out and "--temperature" in out and "--weights" in out


def test_the_stop_example_in_the_help_gives_real_newlines(capsys: pytest.CaptureFixture[str]) -> None:
    import re
    import shutil
    import subprocess

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "taken literally" in out
    quoted = re.search(r"--stop (\S+)\n", out).group(1)  # the example's argument, as a shell reads it
    assert quoted == "$'\\n\\n'"
    if shutil.which("bash"):
        argument = subprocess.run(["bash", "-c", f"printf %s {quoted}"], capture_output=True, text=True).stdout
        assert argument == "\n\n"
