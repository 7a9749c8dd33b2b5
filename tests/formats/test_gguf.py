"""GGUF blocks ⇄ ternary codes and scales, tensor names, rope row order, and reading malformed GGUF files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from bittern import quant  # noqa: E402
from bittern.errors import ConfigError, CorruptCheckpointError, MissingFileError, UnknownFormatError  # noqa: E402
from bittern.formats import gguf as fmt  # noqa: E402
from bittern.formats.common import TernaryWeight  # noqa: E402


def random_ternary(n: int, k: int, seed: int = 0, per_channel: bool = False) -> TernaryWeight:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator) * 0.05
    codes, scale = quant.ternarize(weight, per_channel=per_channel)
    return TernaryWeight(codes, scale)


@pytest.mark.parametrize("type_name", fmt.TERNARY_TYPE_NAMES)
def test_codes_round_trip_exactly_and_scale_is_the_fp16_value(type_name: str) -> None:
    weight = random_ternary(24, 512)
    data = fmt.ternary_to_blocks(weight, type_name)
    bytes_per_block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name.upper()]][1]
    assert data.dtype == np.uint8 and data.shape == (24, 2 * bytes_per_block)
    back = fmt.ternary_from_blocks(data, type_name, (24, 512))
    assert torch.equal(back.codes, weight.codes)
    assert back.scale.shape == (1,)
    # the block holds d = fp16(1 / s_w); reading takes 1 / d
    d = (1 / weight.scale).to(torch.float16).to(torch.float32)
    assert torch.equal(back.scale, 1 / d)
    assert torch.equal(back.scale, fmt.fp16_scale(weight.scale))
    assert abs(float(back.scale[0]) / float(weight.scale[0]) - 1) < 2**-11 + 2**-22  # fp16 rounding only


@pytest.mark.parametrize("type_name", fmt.TERNARY_TYPE_NAMES)
def test_blocks_match_the_gguf_dequantization(type_name: str) -> None:
    """What llama.cpp computes with (gguf's reference dequantization) is codes * fp16(1 / s_w)."""
    weight = random_ternary(8, 256, seed=3)
    data = fmt.ternary_to_blocks(weight, type_name)
    values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name.upper()])
    expected = (weight.codes.to(torch.float32) * fmt.fp16_code_value(weight.scale)).numpy()
    np.testing.assert_array_equal(values, expected)


@pytest.mark.parametrize("type_name", fmt.TERNARY_TYPE_NAMES)
def test_all_zero_blocks_carry_no_scale(type_name: str) -> None:
    weight = random_ternary(4, 768, seed=1)
    weight.codes[1, 256:512] = 0  # one all-zero block: stored with d = 0
    weight.codes[3] = 0  # an all-zero row
    data = fmt.ternary_from_blocks(fmt.ternary_to_blocks(weight, type_name), type_name, (4, 768))
    assert torch.equal(data.codes, weight.codes)
    assert data.scale.shape == (1,)  # the zero blocks do not make it look per-row
    assert torch.equal(data.scale, fmt.fp16_scale(weight.scale))
    zero = TernaryWeight(torch.zeros(2, 256, dtype=torch.int8), torch.tensor([0.5]))
    back = fmt.ternary_from_blocks(fmt.ternary_to_blocks(zero, type_name), type_name, (2, 256))
    assert torch.equal(back.codes, zero.codes) and back.scale.tolist() == [pytest.approx(1 / quant.EPS)]


def test_per_row_scales_round_trip() -> None:
    weight = random_ternary(6, 256, seed=2, per_channel=True)
    back = fmt.ternary_from_blocks(fmt.ternary_to_blocks(weight, "tq2_0"), "tq2_0", (6, 256))
    assert torch.equal(back.codes, weight.codes)
    assert torch.equal(back.scale, fmt.fp16_scale(weight.scale))


def test_blocks_of_one_row_with_different_scales_are_refused() -> None:
    values = np.sign(np.random.default_rng(0).standard_normal((2, 512))).astype(np.float32)
    values[:, 256:] *= 2.0  # second block of every row: another scale
    data = gguf.quants.quantize(values, gguf.GGMLQuantizationType.TQ2_0)
    with pytest.raises(CorruptCheckpointError, match=r"blk\.0\.attn_q\.weight.*different scales"):
        fmt.ternary_from_blocks(data, "tq2_0", (2, 512), "blk.0.attn_q.weight")


def test_invalid_two_bit_code_is_refused() -> None:
    data = fmt.ternary_to_blocks(random_ternary(1, 256), "tq2_0")
    data[0, 0] |= 0b11  # code 3 (= value 2) in the first slot
    with pytest.raises(CorruptCheckpointError, match="outside"):
        fmt.ternary_from_blocks(data, "tq2_0", (1, 256), "w")


def test_rows_not_a_multiple_of_256_are_refused_by_the_ternary_types() -> None:
    with pytest.raises(ConfigError, match=r"'w'.*576.*multiple of 256"):
        fmt.ternary_to_blocks(random_ternary(4, 576), "tq1_0", "w")


def test_rope_permutation_is_llama_cpps_and_inverts() -> None:
    rows = torch.arange(16).reshape(16, 1)  # 2 heads of 8 rows: halves [0..3] [4..7] → interleaved pairs
    permuted = fmt.permute_rope_rows(rows, n_head=2)
    assert permuted[:8, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert torch.equal(fmt.permute_rope_rows(permuted, 2, inverse=True), rows)
    scale = torch.arange(12.0)
    assert torch.equal(fmt.permute_rope_rows(fmt.permute_rope_rows(scale, 3), 3, inverse=True), scale)


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        ("model.layers.3.self_attn.q_proj.weight", "blk.3.attn_q.weight"),
        ("model.layers.0.self_attn.o_proj.bias", "blk.0.attn_output.bias"),
        ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
        ("model.layers.1.post_attention_layernorm.weight", "blk.1.ffn_norm.weight"),
        ("model.layers.2.self_attn.attn_sub_norm.weight", "blk.2.attn_sub_norm.weight"),
        ("model.layers.2.mlp.ffn_sub_norm.weight", "blk.2.ffn_sub_norm.weight"),
    ],
)
def test_tensor_names_map_both_ways(key: str, name: str) -> None:
    assert fmt.gguf_tensor_name(key, "bitnet" if "sub_norm" in key else "llama") == name
    assert fmt.hf_tensor_name(name) == key


def test_a_tensor_the_architecture_has_no_place_for_is_refused() -> None:
    with pytest.raises(UnknownFormatError, match="attn_sub_norm"):
        fmt.gguf_tensor_name("model.layers.0.self_attn.attn_sub_norm.weight", "llama")
    with pytest.raises(UnknownFormatError, match="q_norm"):
        fmt.gguf_tensor_name("model.layers.0.self_attn.q_norm.weight", "llama")


def test_recover_ternary_from_dense_values() -> None:
    weight = random_ternary(4, 96, seed=5)
    values = quant.dequantize_weight(weight.codes, weight.scale)  # codes / s_w: magnitude v = 1 / s_w
    back = fmt.recover_ternary(values)
    assert back is not None and torch.equal(back.codes, weight.codes)
    assert torch.equal(back.scale, 1 / (1 / weight.scale))  # s_w = 1 / v: the scale up to its last bit
    assert fmt.recover_ternary(torch.randn(4, 96)) is None


def _write_gguf(path, architecture: str = "llama") -> None:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_reading_malformed_files_gives_one_clear_error(tmp_path) -> None:
    with pytest.raises(MissingFileError, match="does not exist"):
        fmt.read_gguf(tmp_path / "absent.gguf")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CorruptCheckpointError, match=r"garbage\.gguf.*not a readable GGUF"):
        fmt.read_gguf(garbage)
    whole = tmp_path / "whole.gguf"
    _write_gguf(whole)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole.read_bytes()[:60])
    with pytest.raises(CorruptCheckpointError, match=r"truncated\.gguf.*truncated or corrupt \(60 bytes") as error:
        fmt.read_gguf(truncated)
    assert "reshape" not in str(error.value) and "array" not in str(error.value)  # no raw numpy message
    other = tmp_path / "qwen.gguf"
    _write_gguf(other, "qwen2")
    with pytest.raises(UnknownFormatError, match="'qwen2'"):
        fmt.read_gguf(other)
    with pytest.raises(CorruptCheckpointError, match=r"llama\.embedding_length"):
        fmt.read_gguf(whole)
