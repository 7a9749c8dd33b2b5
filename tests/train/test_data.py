"""Training data (reading sources, hold-out split, packing, the unigram baseline), the embedded corpus and the
locally trained tokenizer."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from bittern.errors import ConfigError
from bittern.train.corpus import default_corpus, pydoc_topics
from bittern.train.data import (
    PackedBlocks,
    read_corpus,
    split_documents,
    token_split,
    tokenize_documents,
    unigram_perplexity,
)
from bittern.train.tokenizer import END_OF_TEXT, load_tokenizer, train_bpe_tokenizer


@pytest.fixture(scope="module")
def topics() -> list[str]:
    return pydoc_topics()[:40]


@pytest.fixture(scope="module")
def tokenizer(topics: list[str]):
    return train_bpe_tokenizer(topics[:12], 300)


def _jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _conversation(index: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {index}"}, {"role": "assistant", "content": "ok"}]}


# -- read_corpus ------------------------------------------------------------------------------------------


def test_a_directory_is_read_sorted_by_path_and_only_text_suffixes(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.md").write_text("ay", encoding="utf-8")
    (tmp_path / "sub" / "c.rst").write_text("sea", encoding="utf-8")
    (tmp_path / "g.text").write_text("gee", encoding="utf-8")
    _jsonl(tmp_path / "d.jsonl", [{"text": "dee one"}, {"text": "dee two"}])
    for ignored in ("e.py", "f.json", "h.csv", "i.bin"):
        (tmp_path / ignored).write_text("must not be read", encoding="utf-8")
    corpus = read_corpus([tmp_path])
    assert corpus.documents == ["ay", "bee", "dee one", "dee two", "gee", "sea"]
    assert corpus.conversations == [] and not corpus.is_chat


def test_a_directory_without_text_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.py").write_text("print()", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        read_corpus([tmp_path])


def test_jsonl_text_records_are_documents_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "first"}\n\n{"text": "second\\nline"}\n', encoding="utf-8")
    corpus = read_corpus([str(path)])
    assert corpus.documents == ["first", "second\nline"]
    assert not corpus.is_chat


def test_jsonl_messages_records_are_conversations(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "chat.jsonl", [_conversation(0), _conversation(1)])
    corpus = read_corpus([path])
    assert corpus.is_chat and corpus.documents == []
    assert corpus.conversations == [_conversation(0)["messages"], _conversation(1)["messages"]]


def test_several_sources_are_read_in_the_given_order(tmp_path: Path) -> None:
    (tmp_path / "z.txt").write_text("zed", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    assert read_corpus([tmp_path / "z.txt", tmp_path / "a.txt"]).documents == ["zed", "ay"]


def test_mixing_text_and_chat_is_refused(tmp_path: Path) -> None:
    text = _jsonl(tmp_path / "text.jsonl", [{"text": "plain"}])
    chat = _jsonl(tmp_path / "chat.jsonl", [_conversation(0)])
    with pytest.raises(ConfigError, match="mixes plain text and chat"):
        read_corpus([text, chat])
    both = _jsonl(tmp_path / "both.jsonl", [{"text": "plain"}, _conversation(0)])
    with pytest.raises(ConfigError, match="mixes plain text and chat"):
        read_corpus([both])


@pytest.mark.parametrize("name", ["empty.txt", "blank.md", "empty.jsonl"])
def test_an_empty_file_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    (tmp_path / "good.txt").write_text("some text", encoding="utf-8")
    (tmp_path / name).write_text("  \n\n" if name != "empty.txt" else "", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(name) + ".*empty"):
        read_corpus([tmp_path])
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / name))):
        read_corpus([tmp_path / name])


def test_a_malformed_jsonl_line_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "unterminated\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: line 3") + ".*not valid JSON"):
        read_corpus([path])
    wrong = _jsonl(tmp_path / "wrong.jsonl", [{"text": "fine"}, {"text": "fine"}, {"content": "no text"}])
    with pytest.raises(ConfigError, match=re.escape(f"{wrong}: line 3") + ".*'text'.*'messages'"):
        read_corpus([wrong])
    roles = _jsonl(tmp_path / "roles.jsonl", [{"messages": [{"content": "who am I"}]}])
    with pytest.raises(ConfigError, match=re.escape(f"{roles}: line 1") + ".*'role'"):
        read_corpus([roles])


def test_a_missing_path_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(ConfigError, match=re.escape(f"--data {missing}: no such file")):
        read_corpus([missing])


def test_a_saved_dataset_directory_is_read(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    texts = ["alpha document", "beta document", "gamma"]
    datasets.Dataset.from_dict({"text": texts, "source": ["x", "y", "z"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_corpus([tmp_path / "ds"]).documents == texts

    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["train only"]}),
        test=datasets.Dataset.from_dict({"text": ["never read"]}),
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert read_corpus([tmp_path / "dict"]).documents == ["train only"]

    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "nocol"))
    with pytest.raises(ConfigError, match="'text' or 'messages' column"):
        read_corpus([tmp_path / "nocol"])


def test_the_embedded_corpus_starts_with_the_help_topics() -> None:
    topics = pydoc_topics()
    assert len(topics) > 40 and all(t and t == t.strip() for t in topics)
    assert pydoc_topics() == topics, "deterministic within one interpreter"
    assert default_corpus(docstrings=False) == topics


# -- hold-out split ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "fraction"), [(20, 0.05), (21, 0.05), (99, 0.05), (100, 0.1), (7, 0.3)])
def test_split_documents_holds_out_every_kth_document_without_overlap(count: int, fraction: float) -> None:
    every = round(1 / fraction)
    train, held = split_documents(count, fraction)
    assert held == list(range(every // 2, count, every))
    assert not set(train) & set(held)
    assert sorted(train + held) == list(range(count))
    assert train == sorted(train)
    assert len(held) == pytest.approx(count * fraction, abs=1)


def test_split_documents_with_too_few_documents_returns_none_and_checks_the_fraction() -> None:
    assert split_documents(19, 0.05) is None
    assert split_documents(0, 0.05) is None
    with pytest.raises(ConfigError, match="--eval-fraction"):
        split_documents(100, 0.5)


def test_token_split_holds_out_exactly_the_held_out_documents(topics: list[str], tokenizer) -> None:
    train_ids, held_ids, how = token_split(tokenizer, topics, 0.05)
    train_idx, held_idx = split_documents(len(topics), 0.05)
    assert held_idx == [10, 30]
    assert how == "every 20th document held out (2 of 40)"
    eos = tokenizer.eos_token_id

    def documents_of(stream: torch.Tensor) -> list[str]:
        ids = stream.tolist()
        assert ids[-1] == eos, "every document ends with the separator"
        pieces, start = [], 0
        for i, token in enumerate(ids):
            if token == eos:
                pieces.append(tokenizer.decode(ids[start:i]))
                start = i + 1
        return pieces

    assert documents_of(held_ids) == [topics[i] for i in held_idx]
    assert documents_of(train_ids) == [topics[i] for i in train_idx]
    assert train_ids.dtype == held_ids.dtype == torch.long
    assert held_ids.tolist() == tokenize_documents(tokenizer, [topics[10], topics[30]])


def test_token_split_with_few_documents_holds_out_the_tail_of_the_stream(topics: list[str], tokenizer) -> None:
    documents = topics[:5]
    train_ids, held_ids, how = token_split(tokenizer, documents, 0.1)
    stream = tokenize_documents(tokenizer, documents)
    assert train_ids.tolist() + held_ids.tolist() == stream
    assert held_ids.numel() == len(stream) - int(len(stream) * 0.9)
    assert "last 10% of the token stream" in how


def test_tokenize_documents_appends_the_separator_after_each_document(tokenizer) -> None:
    stream = tokenize_documents(tokenizer, ["ab", "cd ef"])
    first = tokenizer("ab", add_special_tokens=False)["input_ids"]
    second = tokenizer("cd ef", add_special_tokens=False)["input_ids"]
    assert stream == [*first, tokenizer.eos_token_id, *second, tokenizer.eos_token_id]


# -- packing and the baseline -----------------------------------------------------------------------------


def test_packed_blocks_cut_consecutive_blocks_and_drop_the_remainder() -> None:
    blocks = PackedBlocks(torch.arange(103), 10)
    assert len(blocks) == 10 and blocks.tokens == 100
    for index in (0, 4, 9):
        item = blocks[index]
        assert item["input_ids"].tolist() == list(range(10 * index, 10 * index + 10))
        assert torch.equal(item["labels"], item["input_ids"])
    loader = torch.utils.data.DataLoader(blocks, batch_size=4)
    assert next(iter(loader))["input_ids"].shape == (4, 10)


def test_packed_blocks_refuse_text_shorter_than_one_block_and_tiny_blocks() -> None:
    with pytest.raises(ConfigError, match="5 tokens, fewer than one block of --seq-len 8"):
        PackedBlocks(torch.arange(5), 8)
    with pytest.raises(ConfigError, match="--seq-len must be at least 2"):
        PackedBlocks(torch.arange(50), 1)


def test_unigram_perplexity_matches_a_hand_computation() -> None:
    # add-one counts of [0, 0, 1, 2] over 4 symbols: [3, 2, 2, 1] / 8; held-out [0, 3]: p = 3/8 and 1/8
    value = unigram_perplexity(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 3]), vocab_size=4)
    assert value == pytest.approx(math.exp(-(math.log(3 / 8) + math.log(1 / 8)) / 2), rel=1e-12)
    assert value == pytest.approx(8 / math.sqrt(3), rel=1e-12)
    # a uniform training stream gives perplexity = vocabulary size
    assert unigram_perplexity(torch.arange(6), torch.tensor([1, 5, 2]), 6) == pytest.approx(6.0)


# -- tokenizer --------------------------------------------------------------------------------------------


def test_bpe_training_is_deterministic(topics: list[str], tokenizer) -> None:
    again = train_bpe_tokenizer(topics[:12], 300)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    text = topics[20][:2000]
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert 256 < len(tokenizer) <= 300


def test_bpe_tokenizer_round_trips_text_and_uses_endoftext_for_everything(tokenizer) -> None:
    text = "def f(x):\n    return x ** 2  # naïve café — ünïcode ✓ 数字\n\n\ttabs and  spaces "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")), "merges must compress the text"
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == END_OF_TEXT
    eos = tokenizer.eos_token_id
    assert tokenizer.bos_token_id == tokenizer.pad_token_id == eos
    assert tokenizer(END_OF_TEXT, add_special_tokens=False)["input_ids"] == [eos], "one special token"


def test_bpe_tokenizer_refuses_a_vocabulary_below_the_byte_alphabet() -> None:
    with pytest.raises(ConfigError, match="--vocab-size must be at least 300"):
        train_bpe_tokenizer(["some text"], 299)


def test_a_saved_tokenizer_loads_back_identically(tmp_path: Path, tokenizer, topics: list[str]) -> None:
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded(topics[3])["input_ids"] == tokenizer(topics[3])["input_ids"]
    assert loaded.eos_token == loaded.pad_token == END_OF_TEXT


def test_load_tokenizer_without_tokenizer_files_names_the_directory(tmp_path: Path) -> None:
    directory = tmp_path / "no_tokenizer_here"
    directory.mkdir()
    (directory / "notes.txt").write_text("nothing useful", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(str(directory)) + ".*no usable tokenizer"):
        load_tokenizer(directory)
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "missing")) + ": not a directory"):
        load_tokenizer(tmp_path / "missing")
