"""llama.cpp (llama-cpp-python, the optional ``llama`` extra) runs bittern's GGUF files as the same model:
perplexity on held-out text within 1% of bittern's own and the same greedy continuations, for a Llama-style and a
BitNet-style (sub-norms) model trained in this session; and it shows where llama.cpp's bitnet graph differs.

Skipped without llama-cpp-python (``pip install 'bittern[llama]'``; CI installs it)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from gguf_models import documents, make_spm_tokenizer, model_config, train_briefly, write_model

import bittern
from bittern.eval.perplexity import sliding_window_nll, tokenize
from bittern.export import export_gguf
from bittern.export import llama_cpp as runner

WINDOW = 128
PROMPTS = ("The import statement", "A class definition", "Exceptions are raised")


@pytest.fixture(scope="module")
def tokenizer():
    from bittern.train.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(documents(0, 24), 384)


@pytest.fixture(scope="module")
def spm_tokenizer():
    return make_spm_tokenizer()


@pytest.fixture(scope="module")
def held_out(tokenizer) -> torch.Tensor:
    """~1000 tokens of help() topics the models were not trained on (they train on topics 0-23)."""
    return tokenize(tokenizer, "\n\n".join(documents(60, 79)))[: 8 * WINDOW + 1]


def _trained_dir(tmp_path_factory, tokenizer, name: str, config, variant: str = "packed"):
    model = train_briefly(config, tokenizer, documents(0, 24))
    directory = tmp_path_factory.mktemp(name) / variant
    bittern.save_model(model, directory, variant)
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    config = model_config("llama", len(tokenizer), hidden=256, intermediate=256, max_position_embeddings=256)
    return _trained_dir(tmp_path_factory, tokenizer, "llama", config)


@pytest.fixture(scope="module")
def bitnet_dir(tmp_path_factory, tokenizer):
    config = model_config(
        "bitnet", len(tokenizer), hidden=256, intermediate=256, max_position_embeddings=256, hidden_act="silu"
    )
    return _trained_dir(tmp_path_factory, tokenizer, "bitnet", config)


def _bittern_greedy(model, tokenizer, prompt: str, new_tokens: int = 32) -> tuple[list[int], list[int]]:
    ids = tokenize(tokenizer, prompt)
    with torch.no_grad():
        out = model.generate(ids[None], max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    return ids.tolist(), out[0, ids.numel() :].tolist()


def _check_parity(source, tokenizer, held_out, tmp_path, type_name: str) -> None:
    path = export_gguf(source, tmp_path / f"{type_name}.gguf", type_name).path
    model = bittern.load_model(source)
    ours = sliding_window_nll(model, held_out, WINDOW, WINDOW)
    theirs = runner.perplexity(path, held_out.tolist(), WINDOW, WINDOW)
    assert ours.tokens == theirs.tokens
    assert ours.perplexity < 0.5 * len(tokenizer)  # trained: far better than uniform
    assert runner.mean_nll_gap(theirs, ours) < 0.01, (theirs.perplexity, ours.perplexity)
    for prompt in PROMPTS:
        prompt_ids, expected = _bittern_greedy(model, tokenizer, prompt)
        assert runner.greedy(path, prompt_ids, 32) == expected, prompt


@pytest.mark.slow
@pytest.mark.parametrize("type_name", ["tq2_0", "tq1_0"])
def test_llama_style_model_matches_in_llama_cpp(llama_dir, tokenizer, held_out, tmp_path, type_name) -> None:
    _check_parity(llama_dir, tokenizer, held_out, tmp_path, type_name)


@pytest.mark.slow
def test_bitnet_style_model_matches_in_llama_cpp(bitnet_dir, tokenizer, held_out, tmp_path) -> None:
    _check_parity(bitnet_dir, tokenizer, held_out, tmp_path, "tq2_0")


@pytest.mark.slow
def test_llama_cpp_bitnet_graph_computes_silu_whatever_the_model_says(
    bitnet_dir, tokenizer, held_out, tmp_path
) -> None:
    """The same weights labelled relu²: bittern computes relu² (another model), llama.cpp still SiLU — which is
    why the exporter refuses relu² BitNet models by default."""
    import json

    relu2 = tmp_path / "relu2"
    relu2.mkdir()
    for item in bitnet_dir.iterdir():
        (relu2 / item.name).write_bytes(item.read_bytes())
    config = json.loads((relu2 / "config.json").read_text())
    config["hidden_act"] = "relu2"
    (relu2 / "config.json").write_text(json.dumps(config))
    path = export_gguf(relu2, tmp_path / "relu2.gguf", allow_activation_mismatch=True).path
    ids = held_out[:WINDOW]
    with torch.no_grad():
        silu = bittern.load_model(bitnet_dir)(ids[None]).logits[0]
        relu2_logits = bittern.load_model(relu2)(ids[None]).logits[0]
    with runner.open_model(path, n_ctx=WINDOW) as model:
        model.eval(ids.tolist())
        theirs = torch.from_numpy(model.scores[:WINDOW].copy())
    to_silu = (theirs - silu).abs().mean()
    to_relu2 = (theirs - relu2_logits).abs().mean()
    assert to_relu2 > 10 * to_silu, (float(to_silu), float(to_relu2))  # llama.cpp computed the SiLU model


@pytest.mark.slow
def test_row_policy_fallback_tensors_compute_the_same_in_llama_cpp(tokenizer, held_out, tmp_path) -> None:
    """Q8_0 (K=96) and F16 (K=200) fallbacks of the row policy, on a briefly trained model."""
    config = model_config("llama", len(tokenizer), hidden=96, intermediate=200, max_position_embeddings=256)
    model = train_briefly(config, tokenizer, documents(0, 24), steps=15)
    source = tmp_path / "odd"
    bittern.save_model(model, source, "packed")
    tokenizer.save_pretrained(str(source))
    with pytest.warns(bittern.export.RowFallbackWarning):
        path = export_gguf(source, tmp_path / "odd.gguf").path
    ours = sliding_window_nll(bittern.load_model(source), held_out, WINDOW, WINDOW)
    theirs = runner.perplexity(path, held_out.tolist(), WINDOW, WINDOW)
    assert runner.mean_nll_gap(theirs, ours) < 0.01, (theirs.perplexity, ours.perplexity)


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_llama_cpp_tokenizes_like_the_hugging_face_tokenizer(kind, tmp_path, tokenizer, spm_tokenizer) -> None:
    hf = spm_tokenizer if kind == "spm" else tokenizer
    source = write_model(tmp_path / kind, model_config("llama", len(hf)), hf)
    path = export_gguf(source, tmp_path / "t.gguf").path
    text = "\n\n".join(documents(60, 62))[:3000] + " Unicode: café – naïve 12345."
    with runner.open_model(path, n_ctx=64, logits_all=False) as model:
        theirs = model.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    assert theirs == hf(text, add_special_tokens=False)["input_ids"]
