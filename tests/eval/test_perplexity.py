"""``bittern.eval.perplexity`` and ``bittern eval``: strided windows against brute force, batching, dtypes,
data files, errors, and the command line end to end on a ternary checkpoint with a locally trained tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, token_batch

from bittern import save_model, to_bitlinear, to_ternary
from bittern.cli import main
from bittern.errors import ConfigError, MissingFileError
from bittern.eval import PerplexityResult, evaluate_file, sliding_window_nll

LENGTH = 70  # tokens in the random sequences


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    """A tiny random float32 Llama (vocab 256, max positions 256)."""
    return tiny_model("llama", head_gain=2.0)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    """int64 ``[LENGTH]`` random token ids."""
    return token_batch(batch=1, length=LENGTH)[0]


def _token_nll(model: torch.nn.Module, context: torch.Tensor, target: int) -> float:
    """``-log p(target | context)`` in nats, from one forward over ``context`` alone (float64 log-softmax)."""
    with torch.no_grad():
        logits = model(context[None]).logits[0, -1].double()
    return float(-torch.log_softmax(logits, dim=-1)[target])


def _brute_force(model: torch.nn.Module, ids: torch.Tensor, window: int, stride: int) -> float:
    """Sum of NLLs, token by token, from the stated semantics: token ``t`` is scored by the first window
    ``k`` whose predictions reach it (``k*stride + window >= t``), with context ``ids[k*stride : t]``."""
    total = 0.0
    for t in range(1, ids.numel()):
        k = max(0, math.ceil((t - window) / stride))
        begin = k * stride
        assert begin < t <= begin + window
        total += _token_nll(model, ids[begin:t], int(ids[t]))
    return total


def _full_forward_nll(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids[None]).logits[0].float()
    return float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum"))


@pytest.mark.parametrize(("window", "stride"), [(16, 16), (16, 5), (16, 1), (40, 30)])
def test_every_token_scored_once_with_its_stated_context(
    llama: torch.nn.Module, ids: torch.Tensor, window: int, stride: int
) -> None:
    result = sliding_window_nll(llama, ids, window, stride, batch_size=3)
    assert result.tokens == LENGTH - 1
    assert (result.window, result.stride) == (window, stride)
    assert result.nll_sum == pytest.approx(_brute_force(llama, ids, window, stride), rel=1e-5)


def test_disjoint_windows_equal_per_window_cross_entropy(llama: torch.nn.Module, ids: torch.Tensor) -> None:
    window = 16
    total, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, LENGTH - 1, window):
            end = min(begin + window, LENGTH - 1)
            logits = llama(ids[None, begin:end]).logits[0].float()
            targets = ids[begin + 1 : end + 1]
            total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += targets.numel()
    assert count == LENGTH - 1
    result = sliding_window_nll(llama, ids, window, window)
    assert result.tokens == count
    assert result.nll_sum == pytest.approx(total, rel=1e-6)


@pytest.mark.parametrize("window", [LENGTH - 1, LENGTH, 200])
def test_window_covering_the_text_equals_one_full_forward(
    llama: torch.nn.Module, ids: torch.Tensor, window: int
) -> None:
    result = sliding_window_nll(llama, ids, window, window // 2)
    full = _full_forward_nll(llama, ids)
    assert result.tokens == LENGTH - 1
    assert result.mean_nll == pytest.approx(full / (LENGTH - 1), rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(full / (LENGTH - 1)), rel=1e-5)


def test_more_context_changes_the_estimate(llama: torch.nn.Module, ids: torch.Tensor) -> None:
    disjoint = sliding_window_nll(llama, ids, 16, 16)
    overlapping = sliding_window_nll(llama, ids, 16, 4)
    assert disjoint.tokens == overlapping.tokens == LENGTH - 1
    assert abs(disjoint.mean_nll - overlapping.mean_nll) > 1e-4


@pytest.mark.parametrize(("window", "stride"), [(16, 8), (16, 16), (10, 3)])
def test_batching_does_not_change_the_result(
    llama: torch.nn.Module, ids: torch.Tensor, window: int, stride: int
) -> None:
    one = sliding_window_nll(llama, ids, window, stride, batch_size=1)
    four = sliding_window_nll(llama, ids, window, stride, batch_size=4)
    assert one.tokens == four.tokens == LENGTH - 1
    assert four.mean_nll == pytest.approx(one.mean_nll, abs=1e-5)


def test_bfloat16_model_gives_a_close_finite_result(ids: torch.Tensor) -> None:
    model = tiny_model("llama", head_gain=2.0)
    reference = sliding_window_nll(model, ids, 32, 16)
    model.to(torch.bfloat16)
    model.train()  # the evaluation switches to eval mode and restores the flag
    result = sliding_window_nll(model, ids, 32, 16)
    assert model.training
    assert math.isfinite(result.perplexity)
    assert result.mean_nll == pytest.approx(reference.mean_nll, rel=2e-2)


def test_result_properties() -> None:
    result = PerplexityResult(nll_sum=6.0, tokens=3, window=4, stride=2)
    assert result.mean_nll == 2.0
    assert result.perplexity == pytest.approx(math.exp(2.0))
    assert result.as_dict() == {
        "nll_sum": 6.0,
        "tokens": 3,
        "window": 4,
        "stride": 2,
        "mean_nll": 2.0,
        "perplexity": pytest.approx(math.exp(2.0)),
    }
    with pytest.raises(AttributeError):
        result.tokens = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"window": 1, "stride": 1}, "window"),
        ({"window": 0, "stride": 1}, "window"),
        ({"window": 300, "stride": 10}, "window"),  # beyond max_position_embeddings (256)
        ({"window": 8, "stride": 0}, "stride"),
        ({"window": 8, "stride": 9}, "stride"),
        ({"window": 8, "stride": 4, "batch_size": 0}, "batch_size"),
        ({"window": 8.0, "stride": 4}, "window"),
    ],
)
def test_bad_arguments_name_the_argument(llama: torch.nn.Module, ids: torch.Tensor, kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        sliding_window_nll(llama, ids, **kwargs)


@pytest.mark.parametrize(
    "token_ids",
    [torch.tensor([5]), torch.tensor([], dtype=torch.long), torch.zeros(2, 8, dtype=torch.long), torch.ones(4)],
)
def test_bad_token_ids_are_refused(llama: torch.nn.Module, token_ids: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="token_ids"):
        sliding_window_nll(llama, token_ids, 8, 4)


def test_token_ids_outside_the_vocabulary_are_refused(llama: torch.nn.Module) -> None:
    with pytest.raises(ConfigError, match="vocabulary"):
        sliding_window_nll(llama, torch.tensor([1, 2, 256]), 8, 4)


# --- end to end: a ternary checkpoint with a locally trained tokenizer ---------------------------------------


def _corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _train_tokenizer(text: str):
    """A byte-level BPE tokenizer (~300 entries, BOS ``<s>``) trained on ``text`` with HF ``tokenizers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"packed", "bf16", "tokenizer", "text"}``: a tiny ternary Llama saved as packed and bf16 with a
    tokenizer trained on 6 KB of ``pydoc_data.topics``, and a 3 KB held-out text file."""
    root = tmp_path_factory.mktemp("eval")
    corpus = _corpus()
    tokenizer = _train_tokenizer(corpus[:6000])
    tokenizer.save_pretrained(root / "tokenizer")
    model = tiny_model("llama", head_gain=2.0, vocab_size=len(tokenizer))
    to_bitlinear(model)
    to_ternary(model)
    paths = {"tokenizer": root / "tokenizer", "text": root / "held_out.txt"}
    for variant in ("packed", "bf16"):
        paths[variant] = save_model(model, root / variant, variant, tokenizer_source=root / "tokenizer")
    paths["text"].write_text(corpus[6000:9000], encoding="utf-8")
    return paths


def test_cli_json_matches_evaluate_file(checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, data = str(checkpoints["packed"]), str(checkpoints["text"])
    options = ["--window", "64", "--stride", "32", "--max-tokens", "400"]
    assert main(["eval", model, "--data", data, *options, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = evaluate_file(model, data, window=64, stride=32, max_tokens=400)
    assert expected.tokens == 399
    assert report["variant"] == "packed (divide)"
    assert report["model"] == model
    for key, value in expected.as_dict().items():
        assert report[key] == pytest.approx(value, rel=1e-9), key


def test_cli_human_output_and_defaults(checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(checkpoints["bf16"]), "--data", str(checkpoints["text"]), "--max-tokens", "300"]) == 0
    out = capsys.readouterr().out
    assert "variant:     bf16" in out
    assert "299 scored" in out
    assert "nats/token" in out
    assert "perplexity:" in out
    assert "window:      256 tokens, stride 128" in out  # min(max positions 256, 1024), window // 2


def test_bf16_and_packed_variants_are_close(checkpoints: dict[str, Path]) -> None:
    results = {
        variant: evaluate_file(checkpoints[variant], checkpoints["text"], window=64, stride=64, max_tokens=400)
        for variant in ("packed", "bf16")
    }
    packed, bf16 = results["packed"], results["bf16"]
    assert math.isfinite(packed.perplexity)
    assert math.isfinite(bf16.perplexity)
    assert packed.tokens == bf16.tokens == 399
    assert packed.mean_nll != bf16.mean_nll  # bf16 stores dense tensors and Wt*s rounded to bfloat16
    assert bf16.mean_nll == pytest.approx(packed.mean_nll, rel=1e-2)


def test_jsonl_documents_are_joined_by_a_blank_line(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    text = checkpoints["text"].read_text(encoding="utf-8")
    documents = [text[:1000], text[1000:2000]]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(documents)) + "\n\n")
    plain = tmp_path / "data.md"
    plain.write_text("\n\n".join(documents), encoding="utf-8")
    from_jsonl = evaluate_file(checkpoints["packed"], jsonl, window=64, stride=32)
    from_text = evaluate_file(checkpoints["packed"], plain, window=64, stride=32)
    assert from_jsonl == from_text


def test_bos_is_prepended_once(checkpoints: dict[str, Path]) -> None:
    from bittern.eval import load_tokenizer, tokenize

    tokenizer = load_tokenizer(checkpoints["packed"])
    ids = tokenize(tokenizer, "def f(x): return x")
    assert ids.dtype == torch.long
    assert int(ids[0]) == tokenizer.bos_token_id
    assert (ids == tokenizer.bos_token_id).sum() == 1


def test_data_file_errors_name_the_file(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = checkpoints["packed"]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match=r"empty\.txt"):
        evaluate_file(model, empty)
    no_text = tmp_path / "docs.jsonl"
    no_text.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(ConfigError, match=r"docs\.jsonl.*line 2.*\"text\""):
        evaluate_file(model, no_text)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(ConfigError, match=r"broken\.jsonl.*line 2"):
        evaluate_file(model, broken)
    with pytest.raises(ConfigError, match=r"missing\.txt"):
        evaluate_file(model, tmp_path / "missing.txt")


def test_evaluate_file_argument_errors(checkpoints: dict[str, Path]) -> None:
    model, data = checkpoints["packed"], checkpoints["text"]
    with pytest.raises(ConfigError, match="max_tokens"):
        evaluate_file(model, data, max_tokens=1)
    with pytest.raises(ConfigError, match="stride"):
        evaluate_file(model, data, window=16, stride=17, max_tokens=50)
    with pytest.raises(ConfigError, match="dtype"):
        evaluate_file(model, data, dtype="int8")
    with pytest.raises(ConfigError, match="device"):
        evaluate_file(model, data, device="no-such-device")


def test_missing_tokenizer_names_the_directory(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((checkpoints["packed"] / name).read_bytes())
    with pytest.raises(MissingFileError, match=r"bare.*tokenizer"):
        evaluate_file(bare, checkpoints["text"])


def test_cli_errors_print_one_line(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["eval", str(checkpoints["packed"]), "--data", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bittern: error: ") and "empty.txt" in err
    assert len(err.strip().splitlines()) == 1
    data = str(checkpoints["text"])
    assert main(["eval", str(checkpoints["packed"]), "--data", data, "--window", "8", "--stride", "9"]) == 2
    assert "stride" in capsys.readouterr().err


def test_help_explains_the_stride(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--stride" in out and "window - stride + 1" in out
