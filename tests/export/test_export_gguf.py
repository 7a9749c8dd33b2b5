"""``bittern export gguf``: metadata and tensors as written, the row policy, reading back, and bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf_models import CHAT_TEMPLATE, make_bpe_tokenizer, make_spm_tokenizer, model_config, write_model  # noqa: E402

import bittern  # noqa: E402
from bittern.checkpoint import checkpoint_from_model  # noqa: E402
from bittern.cli import main  # noqa: E402
from bittern.errors import ConfigError, MissingFileError, OutputExistsError, UnknownFormatError  # noqa: E402
from bittern.export import RowFallbackWarning, export_gguf  # noqa: E402
from bittern.formats import gguf as fmt  # noqa: E402
from bittern.formats.gguf import read_gguf  # noqa: E402


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return make_bpe_tokenizer()


@pytest.fixture(scope="module")
def spm_tokenizer():
    return make_spm_tokenizer()


def fields(path) -> tuple[dict, dict]:
    """GGUF metadata (key → value) and tensor types (name → lower-case type name) read with gguf.GGUFReader."""
    reader = gguf.GGUFReader(str(path))
    values = {name: field.contents() for name, field in reader.fields.items()}
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    return values, types


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, bpe_tokenizer):
    directory = tmp_path_factory.mktemp("llama") / "packed"
    return write_model(directory, model_config("llama", len(bpe_tokenizer), rope_theta=50000.0), bpe_tokenizer)


def test_llama_metadata_tokenizer_and_tensor_types(llama_dir, bpe_tokenizer, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RowFallbackWarning)  # hidden 256 / intermediate 512: no fallback
        result = export_gguf(llama_dir, tmp_path / "m.gguf")
    values, types = fields(result.path)
    assert values["general.architecture"] == "llama"
    assert values["llama.embedding_length"] == 256
    assert values["llama.feed_forward_length"] == 512
    assert values["llama.block_count"] == 2
    assert values["llama.attention.head_count"] == 4
    assert values["llama.attention.head_count_kv"] == 2
    assert values["llama.rope.dimension_count"] == 64
    assert values["llama.rope.freq_base"] == pytest.approx(50000.0)
    assert values["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert values["llama.context_length"] == 512
    assert values["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_TQ2_0)
    assert values["tokenizer.ggml.model"] == "gpt2"
    assert values["tokenizer.ggml.pre"] == "gpt-2"
    vocab = bpe_tokenizer.get_vocab()
    tokens = values["tokenizer.ggml.tokens"]
    assert len(tokens) == len(bpe_tokenizer) and all(tokens[i] == t for t, i in vocab.items())
    assert len(values["tokenizer.ggml.merges"]) == len(vocab) - 257  # 256 bytes + <|endoftext|>, rest are merges
    assert values["tokenizer.ggml.bos_token_id"] == bpe_tokenizer.bos_token_id
    assert values["tokenizer.ggml.token_type"][bpe_tokenizer.eos_token_id] == int(gguf.TokenType.CONTROL)
    assert values["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert values[fmt.KEY_HIDDEN_ACT] == "silu"
    linear = [n for n in types if n.startswith("blk.") and n.rsplit(".", 2)[-2].startswith(("attn_", "ffn_"))]
    linear = [n for n in linear if "norm" not in n]
    assert len(linear) == 14 and all(types[n] == "tq2_0" for n in linear)
    assert sorted(values[fmt.KEY_TERNARY]) == sorted(linear)
    assert types["token_embd.weight"] == "f16"
    assert types["output_norm.weight"] == "f32" and types["blk.0.attn_norm.weight"] == "f32"
    assert "output.weight" not in types  # tied head
    assert result.size_bytes == result.path.stat().st_size
    assert not list(tmp_path.glob(".*tmp*"))  # no staging file left


@pytest.mark.parametrize("type_name", ["tq2_0", "tq1_0"])
def test_read_back_gives_the_exact_codes_and_fp16_scales(llama_dir, tmp_path, type_name: str) -> None:
    path = export_gguf(llama_dir, tmp_path / "m.gguf", type_name, embeddings="f32").path
    source = checkpoint_from_model(bittern.load_model(llama_dir))
    back = read_gguf(path)
    assert sorted(back.ternary) == sorted(source.ternary)
    for name, weight in source.ternary.items():
        assert torch.equal(back.ternary[name].codes, weight.codes), name  # q/k rows back in HF order too
        assert torch.equal(back.ternary[name].scale, fmt.fp16_scale(weight.scale)), name
    for key, tensor in source.tensors.items():
        assert torch.equal(back.tensors[key], tensor.float()), key  # f32 embeddings and norms: exact
    assert back.config["hidden_act"] == "silu" and back.config["tie_word_embeddings"] is True


def test_load_model_reads_a_gguf_file_and_computes_the_same_model(llama_dir, tmp_path) -> None:
    path = export_gguf(llama_dir, tmp_path / "m.gguf", embeddings="f32").path
    original = bittern.load_model(llama_dir)
    reloaded = bittern.load_model(path)
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, bittern.TernaryLinear)
    ids = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = original(ids).logits, reloaded(ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95
    torch.testing.assert_close(b, a, atol=5e-3 * float(a.abs().max()), rtol=0)  # fp16 scales only


def test_row_policy_on_widths_that_are_not_multiples_of_256(tmp_path, bpe_tokenizer) -> None:
    """SmolLM2-like widths: K = 96 (a multiple of 32) → Q8_0, K = 200 (not) → F16, one warning listing them."""
    config = model_config("llama", len(bpe_tokenizer), hidden=96, intermediate=200)
    source = write_model(tmp_path / "odd", config, bpe_tokenizer)
    with pytest.warns(RowFallbackWarning) as caught:
        result = export_gguf(source, tmp_path / "odd.gguf", "tq2_0", embeddings="q8_0")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "blk.0-1.attn_q.weight (K=96 → q8_0)" in message and "blk.0-1.ffn_down.weight (K=200 → f16)" in message
    _, types = fields(result.path)
    assert types["blk.0.attn_q.weight"] == "q8_0" and types["blk.1.ffn_up.weight"] == "q8_0"
    assert types["blk.0.ffn_down.weight"] == "f16" and types["token_embd.weight"] == "q8_0"
    assert result.fallbacks == {n: k for n, k in types.items() if n in result.ternary_tensors}
    back = read_gguf(result.path)  # the fallback tensors come back as ternary, codes exact
    source_ck = checkpoint_from_model(bittern.load_model(source))
    for name, weight in source_ck.ternary.items():
        assert torch.equal(back.ternary[name].codes, weight.codes), name
        assert back.ternary[name].scale.item() == pytest.approx(weight.scale.item(), rel=2e-3)


def test_embeddings_fall_back_when_their_rows_do_not_fit(tmp_path, bpe_tokenizer) -> None:
    config = model_config("llama", len(bpe_tokenizer), hidden=80, intermediate=256, num_attention_heads=4)
    source = write_model(tmp_path / "h80", config, bpe_tokenizer)
    with pytest.warns(RowFallbackWarning, match=r"token_embd\.weight \(K=80 → f16\)"):
        result = export_gguf(source, tmp_path / "h80.gguf", "tq1_0", embeddings="q8_0")
    _, types = fields(result.path)
    assert types["token_embd.weight"] == "f16" and types["blk.0.ffn_down.weight"] == "tq1_0"


def test_bitnet_with_silu_is_written_as_llama_cpp_bitnet(tmp_path, bpe_tokenizer) -> None:
    config = model_config("bitnet", len(bpe_tokenizer), hidden_act="silu")
    source = write_model(tmp_path / "bitnet", config, bpe_tokenizer, variant="bf16")
    result = export_gguf(source, tmp_path / "b.gguf")
    values, types = fields(result.path)
    assert values["general.architecture"] == "bitnet" and result.architecture == "bitnet"
    assert types["blk.1.attn_sub_norm.weight"] == "f32" and types["blk.1.ffn_sub_norm.weight"] == "f32"
    assert types["blk.1.ffn_down.weight"] == "tq2_0"
    source_ck = checkpoint_from_model(bittern.load_model(source))
    back = read_gguf(result.path)
    for name, weight in source_ck.ternary.items():  # bitnet: neox rope, no q/k permutation
        assert torch.equal(back.ternary[name].codes, weight.codes), name
    assert back.config["model_type"] == "bitnet"
    assert torch.equal(
        back.tensors["model.layers.1.mlp.ffn_sub_norm.weight"],
        source_ck.tensors["model.layers.1.mlp.ffn_sub_norm.weight"],
    )


def test_relu2_bitnet_is_refused_unless_asked(tmp_path, bpe_tokenizer) -> None:
    source = write_model(tmp_path / "relu2", model_config("bitnet", len(bpe_tokenizer)), bpe_tokenizer)
    out = tmp_path / "r.gguf"
    with pytest.raises(ConfigError, match=r"hidden_act is 'relu2'.*computes the feed-forward with 'silu'"):
        export_gguf(source, out)
    assert not out.exists()
    result = export_gguf(source, out, allow_activation_mismatch=True)
    values, _ = fields(result.path)
    assert values[fmt.KEY_HIDDEN_ACT] == "relu2"
    assert read_gguf(result.path).config["hidden_act"] == "relu2"  # bittern itself reads it back correctly


def test_untied_bitnet_head_is_refused(tmp_path, bpe_tokenizer) -> None:
    config = model_config("bitnet", len(bpe_tokenizer), hidden_act="silu", tie_word_embeddings=False)
    source = write_model(tmp_path / "untied", config, bpe_tokenizer)
    with pytest.raises(ConfigError, match="untied LM head"):
        export_gguf(source, tmp_path / "u.gguf")
    assert not (tmp_path / "u.gguf").exists()


def test_sentencepiece_tokenizer_metadata(tmp_path, spm_tokenizer) -> None:
    source = write_model(tmp_path / "spm", model_config("llama", len(spm_tokenizer)), spm_tokenizer)
    values, _ = fields(export_gguf(source, tmp_path / "s.gguf").path)
    assert values["tokenizer.ggml.model"] == "llama"
    assert "tokenizer.ggml.pre" not in values and "tokenizer.ggml.merges" not in values
    vocab = spm_tokenizer.get_vocab()
    types = values["tokenizer.ggml.token_type"]
    assert types[vocab["<0x41>"]] == int(gguf.TokenType.BYTE)
    assert types[vocab["<unk>"]] == int(gguf.TokenType.UNKNOWN)
    assert types[vocab["<s>"]] == int(gguf.TokenType.CONTROL)
    scores = values["tokenizer.ggml.scores"]  # -rank of the merge that makes each piece: the first merge scores -1
    merged = [i for i, s in enumerate(scores) if s < 0]
    assert merged and max(scores[i] for i in merged) == -1.0
    assert values["tokenizer.ggml.add_bos_token"] is True and values["tokenizer.ggml.add_space_prefix"] is True


def test_unsupported_architecture_is_refused_before_any_work(tmp_path, bpe_tokenizer) -> None:
    source = write_model(tmp_path / "qwen", model_config("qwen2", len(bpe_tokenizer)), bpe_tokenizer)
    with pytest.raises(UnknownFormatError, match=r"architecture 'qwen2' is not exported"):
        export_gguf(source, tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists()


def test_missing_tokenizer_is_refused(tmp_path, bpe_tokenizer) -> None:
    source = write_model(tmp_path / "notok", model_config("llama", len(bpe_tokenizer)))
    with pytest.raises(MissingFileError, match="no tokenizer files"):
        export_gguf(source, tmp_path / "n.gguf")
    assert not (tmp_path / "n.gguf").exists()
    with pytest.raises(MissingFileError, match="does not exist"):
        export_gguf(tmp_path / "absent", tmp_path / "n.gguf")


def test_existing_output_and_failures_leave_no_partial_file(llama_dir, tmp_path, monkeypatch) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="already exists"):
        export_gguf(llama_dir, out)
    assert out.read_bytes() == b"keep me"

    def fail(*args, **kwargs):
        raise ConfigError("simulated failure while encoding")

    monkeypatch.setattr(fmt, "ternary_to_blocks", fail)
    with pytest.raises(ConfigError, match="simulated"):
        export_gguf(llama_dir, out, overwrite=True)
    assert out.read_bytes() == b"keep me"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no staging file left
    with pytest.raises(ConfigError, match="weight type"):
        export_gguf(llama_dir, tmp_path / "x.gguf", "q4_0")


def test_cli_export_gguf(llama_dir, tmp_path, capsys, bpe_tokenizer) -> None:
    out = tmp_path / "cli.gguf"
    assert main(["export", "gguf", str(llama_dir), str(out), "--type", "tq1_0", "--quiet"]) == 0
    assert "llama.cpp architecture 'llama'" in capsys.readouterr().out
    assert fields(out)[1]["blk.0.attn_q.weight"] == "tq1_0"
    assert main(["export", "gguf", str(llama_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite to replace it" in err and "overwrite=True" not in err  # CLI words
    odd = write_model(tmp_path / "odd", model_config("llama", len(bpe_tokenizer), hidden=96), bpe_tokenizer)
    assert main(["export", "gguf", str(odd), str(tmp_path / "odd.gguf"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("bittern: warning:") == 1 and "K=96 → q8_0" in err


def test_inspect_a_gguf_file(llama_dir, tmp_path, capsys) -> None:
    path = export_gguf(llama_dir, tmp_path / "m.gguf", "tq1_0").path
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "gguf" and report["ternary_layers"] == 14
    assert report["bits_per_linear_weight"] == pytest.approx(54 * 8 / 256)  # TQ1_0: 54 bytes per 256 weights
    assert report["tokenizer"] == "in the GGUF file (gpt2, 384 tokens)" and report["chat_template"] is True
    assert main(["inspect", str(path)]) == 0
    assert "tokenizer:             in the GGUF file (gpt2, 384 tokens)" in capsys.readouterr().out


def test_convert_a_gguf_file_writes_its_tokenizer(llama_dir, tmp_path, capsys) -> None:
    from transformers import AutoTokenizer

    path = export_gguf(llama_dir, tmp_path / "m.gguf").path
    out = tmp_path / "packed"
    assert main(["convert", str(path), str(out), "--to", "packed"]) == 0
    reference = AutoTokenizer.from_pretrained(llama_dir)
    converted = AutoTokenizer.from_pretrained(out)
    text = "The import statement, 42 times.\n\n  def f():"
    assert converted(text)["input_ids"] == reference(text)["input_ids"]
    assert converted.chat_template == reference.chat_template


def test_convert_a_gguf_file_keeps_its_16_bit_tensors_16_bit(llama_dir, tmp_path) -> None:
    from safetensors.torch import load_file

    path = export_gguf(llama_dir, tmp_path / "m.gguf", embeddings="f16").path
    assert read_gguf(path).tensors["model.embed_tokens.weight"].dtype == torch.float16
    out = tmp_path / "packed"
    assert main(["convert", str(path), str(out), "--to", "packed"]) == 0
    written = load_file(out / "model.safetensors")
    assert written["model.embed_tokens.weight"].dtype == torch.float16
    want = bittern.load_model(llama_dir).model.embed_tokens.weight.half().float()
    assert torch.equal(bittern.load_model(out).model.embed_tokens.weight, want)


def test_eval_reads_a_gguf_file_with_its_tokenizer(llama_dir, tmp_path, capsys) -> None:
    from bittern.train.corpus import pydoc_topics

    path = export_gguf(llama_dir, tmp_path / "m.gguf").path
    text = tmp_path / "held.txt"
    text.write_text(pydoc_topics()[40][:3000], encoding="utf-8")
    assert main(["eval", str(path), "--data", str(text), "--window", "64", "--json"]) == 0
    from_gguf = json.loads(capsys.readouterr().out)
    assert main(["eval", str(llama_dir), "--data", str(text), "--window", "64", "--json"]) == 0
    from_directory = json.loads(capsys.readouterr().out)
    assert from_gguf["variant"] == "gguf" and from_gguf["tokens"] == from_directory["tokens"]
    # the same codes; the scales rounded to fp16 and the embeddings stored as f16
    assert from_gguf["perplexity"] == pytest.approx(from_directory["perplexity"], rel=1e-2)


def test_corrupt_gguf_through_load_model(tmp_path, llama_dir) -> None:
    path = export_gguf(llama_dir, tmp_path / "m.gguf").path
    data = path.read_bytes()
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(bittern.errors.CorruptCheckpointError, match=r"t\.gguf"):
        bittern.load_model(truncated)
    assert np.frombuffer(data[:4], dtype=np.uint8).tobytes() == b"GGUF"
