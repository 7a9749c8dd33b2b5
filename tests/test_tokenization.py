"""Checkpoint tokenizers (a directory's files or a GGUF file's) and the chat templates ``--chat-template`` names."""

from __future__ import annotations

from pathlib import Path

import pytest

from bittern.errors import ConfigError, MissingFileError
from bittern.tokenization import (
    CHAT_TEMPLATES,
    chat_template_text,
    load_tokenizer,
    set_chat_template,
    tokenizer_source,
)


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer as ``bittern train`` makes one: ``<|endoftext|>`` is BOS/EOS/pad, no template."""
    from bittern.train.corpus import pydoc_topics
    from bittern.train.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(pydoc_topics()[:8], 320)


def test_plain_template_ends_every_turn_with_eos_and_prompts_the_assistant(bpe) -> None:
    set_chat_template(bpe, "plain")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there \n"}]
    text = bpe.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "System: Be brief.<|endoftext|>\nUser: Hi there<|endoftext|>\nAssistant:"
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    assert ids.count(bpe.eos_token_id) == 2  # EOS is one token: generation stops at the end of a reply


def test_chatml_needs_its_two_tokens(bpe) -> None:
    with pytest.raises(ConfigError, match=r"chatml needs the tokens <\|im_start\|>, <\|im_end\|>"):
        set_chat_template(bpe, "chatml")
    bpe.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    set_chat_template(bpe, "chatml")
    text = bpe.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert bpe.chat_template == CHAT_TEMPLATES["chatml"]


def test_a_template_file_is_read_and_a_bad_one_refused(bpe, tmp_path: Path) -> None:
    good = tmp_path / "t.jinja"
    good.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}", encoding="utf-8")
    assert chat_template_text(str(good)) == good.read_text(encoding="utf-8")
    set_chat_template(bpe, str(good))
    assert bpe.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[user] x\n"
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.jinja: the template does not render"):
        set_chat_template(bpe, str(broken))
    assert bpe.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[user] x\n"  # kept
    with pytest.raises(ConfigError, match=r"--chat-template 'nope' is neither a template name \(plain, chatml\)"):
        chat_template_text("nope")


def test_a_directory_without_tokenizer_files_is_named(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"bittern eval needs the model's tokenizer.*no tokenizer files"):
        load_tokenizer(tmp_path, "bittern eval")


def test_tokenizer_source_writes_a_new_template_beside_the_source_files(bpe, tmp_path: Path) -> None:
    source = tmp_path / "model"
    bpe.chat_template = None
    bpe.save_pretrained(source)
    (source / "generation_config.json").write_text("{}", encoding="utf-8")
    with tokenizer_source(source) as directory:
        assert directory == source
    with tokenizer_source(source, "plain") as directory:
        assert directory != source and (directory / "generation_config.json").is_file()
        assert load_tokenizer(directory).chat_template == CHAT_TEMPLATES["plain"]
    assert not directory.exists()  # a temporary directory, removed afterwards
    assert load_tokenizer(source).chat_template is None  # the source is untouched
