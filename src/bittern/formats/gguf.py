"""GGUF (llama.cpp) files: ternary codes and scales ⇄ TQ1_0 / TQ2_0 blocks, the tensor names and row order
llama.cpp expects, the architecture metadata ⇄ Hugging Face config mapping, and reading a GGUF file back
into a :class:`~bittern.formats.common.Checkpoint`.

Facts this module relies on (checked against ``gguf`` 0.19 and the llama.cpp sources vendored in
``llama-cpp-python`` 0.3.36):

* A GGUF row is the *input* dimension: a Hugging Face weight ``[N, K]`` is stored with ``ne = [K, N]``, and
  block types quantize each of the ``N`` rows of ``K`` values in blocks (256 values for TQ1_0 / TQ2_0,
  32 for Q8_0). ``K`` must be a multiple of the block size.
* TQ2_0 / TQ1_0 store 256 codes in {-1, 0, 1} (2 bits each; 5 trits per byte) plus one fp16 scale ``d``
  per block, ``d`` = the block's absmax, a *multiplier*. A ternary tensor ``codes / s_w`` therefore becomes
  blocks whose ``d`` is ``1 / s_w`` rounded to fp16 (:func:`fp16_code_value`), and whose codes are exactly
  ``codes``; reading takes ``s_w = 1 / d``. An all-zero block stores
  ``d = 0`` (and codes 0); it carries no scale, so the reader takes the scale from the other blocks.
* llama.cpp's ``llama`` architecture applies rotary embeddings to interleaved pairs (its "norm" rope), while
  Hugging Face Llama rotates halves: the q/k projection rows are permuted per head on export
  (:func:`permute_rope_rows`) exactly as llama.cpp's own converter does, and un-permuted on import.
  The ``bitnet`` architecture uses the "neox" rope (halves), so no permutation there.
* llama.cpp's ``bitnet`` graph (``src/models/bitnet.cpp``) has ``attn_sub_norm`` / ``ffn_sub_norm``, no
  output head (the token embedding is always the head), and computes its gated feed-forward with **SiLU**.

Every ternary number comes from :mod:`bittern.quant`; nothing here knows about models or training.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bittern import quant
from bittern.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    MissingFileError,
    NonFiniteWeightError,
    UnknownFormatError,
)
from bittern.formats.common import Checkpoint, TernaryWeight

LAYOUT = "gguf"
TERNARY_BLOCK = 256
"""Values per TQ1_0 / TQ2_0 block (``QK_K``): a ternary tensor's rows (K) must be a multiple of it."""

TERNARY_TYPE_NAMES = ("tq2_0", "tq1_0")
DENSE_TYPE_NAMES = ("f32", "f16", "bf16", "q8_0")

ARCHITECTURES = {"llama": "llama", "bitnet": "bitnet"}
"""Hugging Face ``model_type`` → llama.cpp architecture name (the architectures bittern writes and reads)."""

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "bitnet": "BitNetForCausalLM"}
LLAMA_CPP_ACTIVATION = {"llama": "silu", "bitnet": "silu"}
"""The feed-forward activation llama.cpp's graph computes for each architecture (bitnet: see module doc)."""

KEY_HIDDEN_ACT = "bittern.hidden_act"
"""bittern's own metadata: the model's Hugging Face ``hidden_act`` (llama.cpp ignores keys it does not know)."""
KEY_TERNARY = "bittern.ternary_tensors"
"""bittern's own metadata: the GGUF names of every ternary tensor, including those stored as Q8_0/F16."""
KEY_VERSION = "bittern.version"

# Hugging Face module name inside ``model.layers.{i}.`` → the MODEL_TENSOR member name of gguf.
_BLOCK_TENSORS = {
    "input_layernorm": "ATTN_NORM",
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
    "self_attn.attn_sub_norm": "ATTN_SUB_NORM",
    "post_attention_layernorm": "FFN_NORM",
    "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
    "mlp.ffn_sub_norm": "FFN_SUB_NORM",
}
_GLOBAL_TENSORS = {"model.embed_tokens": "TOKEN_EMBD", "model.norm": "OUTPUT_NORM", "lm_head": "OUTPUT"}
_BITNET_ONLY = {"self_attn.attn_sub_norm", "mlp.ffn_sub_norm"}
LINEAR_MODULES = tuple(name for name in _BLOCK_TENSORS if name.endswith("_proj"))
"""The linear layers of a decoder block, as module names inside ``model.layers.{i}.``."""
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_module() -> Any:
    """The ``gguf`` package, or a :class:`ConfigError` saying how to install it."""
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is a dev dependency
        raise ConfigError("GGUF support needs the 'gguf' package: pip install 'bittern[gguf]'") from exc
    return gguf


def quant_type(name: str) -> Any:
    """The ``gguf.GGMLQuantizationType`` called ``name`` (``tq2_0``, ``f16``, ...)."""
    gguf = gguf_module()
    known = (*TERNARY_TYPE_NAMES, *DENSE_TYPE_NAMES)
    if name not in known:
        raise ConfigError(f"unknown GGUF tensor type {name!r}; choose one of {', '.join(known)}")
    return gguf.GGMLQuantizationType[name.upper()]


def block_size(name: str) -> int:
    """Values per block of the type called ``name`` (1 for f32/f16/bf16)."""
    gguf = gguf_module()
    return gguf.GGML_QUANT_SIZES[quant_type(name)][0]


# --- names and row order ------------------------------------------------------------------------------


def gguf_tensor_name(key: str, architecture: str) -> str:
    """The GGUF name of the Hugging Face state-dict ``key`` (``model.layers.3.self_attn.q_proj.weight`` →
    ``blk.3.attn_q.weight``).

    Raises:
        UnknownFormatError: a tensor llama.cpp's ``architecture`` has no place for.
    """
    gguf = gguf_module()
    match = _LAYER.match(key)
    if match:
        block, module, kind = int(match.group(1)), match.group(2), match.group(3)
        member = _BLOCK_TENSORS.get(module)
        if member is not None and (architecture == "bitnet" or module not in _BITNET_ONLY):
            return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]].format(bid=block)}.{kind}"
    else:
        module, _, kind = key.rpartition(".")
        member = _GLOBAL_TENSORS.get(module)
        if member is not None and kind == "weight":
            return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]]}.{kind}"
    raise UnknownFormatError(f"llama.cpp's '{architecture}' architecture has no tensor for '{key}'", tensor=key)


def hf_tensor_name(name: str) -> str | None:
    """The Hugging Face state-dict key of a GGUF tensor name (inverse of :func:`gguf_tensor_name`), or None."""
    gguf = gguf_module()
    stem, _, kind = name.rpartition(".")
    for module, member in _GLOBAL_TENSORS.items():
        if stem == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]]:
            return f"{module}.{kind}"
    match = re.match(r"^blk\.(\d+)\.", stem)
    if match:
        block = int(match.group(1))
        for module, member in _BLOCK_TENSORS.items():
            if gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]].format(bid=block) == stem:
                return f"model.layers.{block}.{module}.{kind}"
    return None


def permute_rope_rows(rows: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """Reorder the output rows of a q/k projection between Hugging Face's rotate-half rope and llama.cpp's
    interleaved ("norm") rope, per head.

    Args:
        rows: ``[n_head * head_dim, ...]`` (weight codes ``[N, K]``, a per-row scale ``[N]`` or a bias ``[N]``).
        n_head: the number of heads of this projection (key/value heads for ``k_proj``).
        inverse: undo the permutation (GGUF → Hugging Face).

    Returns:
        the rows reordered, same shape and dtype.
    """
    n = rows.shape[0]
    if n % (2 * n_head):
        raise ConfigError(f"a projection with {n} rows cannot be split into {n_head} heads of even size")
    half = n // n_head // 2
    rest = tuple(rows.shape[1:])
    if inverse:
        return rows.reshape(n_head, half, 2, *rest).transpose(1, 2).reshape(rows.shape)
    return rows.reshape(n_head, 2, half, *rest).transpose(1, 2).reshape(rows.shape)


# --- ternary blocks -----------------------------------------------------------------------------------


def fp16_code_value(scale: torch.Tensor) -> torch.Tensor:
    """The value of a code, ``1 / s_w``, rounded to fp16 (as float32): the block scale ``d`` a TQ1_0/TQ2_0 block
    holds for the weight scale ``s_w``."""
    return quant.reciprocal(scale.detach()).to(torch.float16).to(torch.float32)


def fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """The weight scale ``s_w`` a ternary block gives back: ``1 / d`` of its :func:`fp16_code_value`."""
    return quant.reciprocal(fp16_code_value(scale))


def ternary_to_blocks(weight: TernaryWeight, type_name: str, name: str = "") -> np.ndarray:
    """Encode a ternary weight as TQ2_0 or TQ1_0 blocks.

    Args:
        weight: codes int8 ``[N, K]`` and a scale ``[1]`` or ``[N]``; ``K`` a multiple of 256, scale < 65504.
        type_name: ``tq2_0`` or ``tq1_0``.
        name: the tensor's name, for error messages.

    Returns:
        uint8 ``[N, K / 256 * bytes_per_block]`` (66 bytes per block for TQ2_0, 54 for TQ1_0). Decoding gives
        back exactly ``codes`` and the scale through an fp16 code value (:func:`fp16_scale`).
    """
    gguf = gguf_module()
    if type_name not in TERNARY_TYPE_NAMES:
        raise ConfigError(f"ternary GGUF type must be one of {', '.join(TERNARY_TYPE_NAMES)}, not {type_name!r}")
    k = weight.codes.shape[1]
    if k % TERNARY_BLOCK:
        raise ConfigError(f"tensor '{name}' has rows of {k} values; {type_name} needs a multiple of {TERNARY_BLOCK}")
    value = fp16_code_value(weight.scale)
    if not bool(torch.isfinite(value).all()) or bool((value <= 0).any()):
        raise ConfigError(f"tensor '{name}': scale {weight.scale.flatten()[:4].tolist()} does not fit an fp16 scale")
    values = weight.codes.to(torch.float32) * value.reshape(-1, 1)  # float32 [N, K]; each block's absmax is d
    return gguf.quants.quantize(values.numpy(), quant_type(type_name))


def ternary_from_blocks(data: np.ndarray, type_name: str, shape: tuple[int, int], name: str = "", path=None):
    """Decode TQ2_0 / TQ1_0 blocks into a :class:`TernaryWeight`.

    Args:
        data: uint8 ``[N, bytes_per_row]`` as stored.
        type_name: ``tq2_0`` or ``tq1_0``.
        shape: ``(N, K)``.

    Returns:
        exact codes, and the scale ``s_w = 1 / d`` of the blocks' fp16 ``d``: one number when every non-zero block
        carries the same ``d``; one per row ``[N]`` when the blocks of each row agree but rows differ. All-zero
        blocks (``d = 0``) carry no scale and are skipped; an all-zero tensor (or row) gets ``1 / quant.EPS``.

    Raises:
        CorruptCheckpointError: a block holding values other than ``{-d, 0, d}`` (e.g. the unused 2-bit code
            3), or blocks of one row with different scales (not a ternary tensor with one scale per tensor or
            per row).
        NonFiniteWeightError: a NaN/Inf block scale.
    """
    gguf = gguf_module()
    n, k = shape
    values = np.asarray(gguf.quants.dequantize(np.ascontiguousarray(data), quant_type(type_name)), dtype=np.float32)
    values = values.reshape(n, k)
    if not np.isfinite(values).all():
        raise NonFiniteWeightError("a block scale is NaN or Inf", path, name)
    magnitude = np.abs(values).reshape(n, k // TERNARY_BLOCK, TERNARY_BLOCK)
    block_scale = magnitude.max(axis=-1)  # [N, blocks]; the block's |d|, 0 for all-zero blocks
    if not ((magnitude == 0) | (magnitude == block_scale[..., None])).all():
        raise CorruptCheckpointError(f"{type_name} blocks hold codes outside {{-1, 0, 1}}", path, name)
    codes = torch.from_numpy(np.sign(values).astype(np.int8))
    present = block_scale > 0
    distinct = np.unique(block_scale[present])
    if distinct.size <= 1:
        value = float(distinct[0]) if distinct.size else quant.EPS
        return TernaryWeight(codes, quant.reciprocal(torch.tensor([value], dtype=torch.float32)))
    row_max = block_scale.max(axis=1)
    if not (~present | (block_scale == row_max[:, None])).all():
        raise CorruptCheckpointError(
            f"its {type_name} blocks carry {distinct.size} different scales within a row "
            f"(e.g. {distinct[0]:g} and {distinct[-1]:g}): not a ternary tensor with one scale per tensor or per row",
            path,
            name,
        )
    value = torch.from_numpy(np.where(row_max > 0, row_max, quant.EPS).astype(np.float32))
    return TernaryWeight(codes, quant.reciprocal(value))


def dense_to_blocks(tensor: torch.Tensor, type_name: str) -> np.ndarray:
    """A dense tensor as GGUF data of ``type_name`` (``f32``, ``f16``, ``bf16``, ``q8_0``): the array
    ``GGUFWriter.add_tensor`` takes (float arrays for f32/f16, uint8 blocks otherwise)."""
    gguf = gguf_module()
    array = tensor.detach().to(torch.float32).contiguous().numpy()
    return gguf.quants.quantize(array, quant_type(type_name))


def recover_ternary(values: torch.Tensor) -> TernaryWeight | None:
    """Codes and scale of a dense ``[N, K]`` tensor whose non-zero values share one magnitude (per tensor,
    else per row) — a ternary tensor stored as Q8_0 or F16 — or None if it is not one
    (:func:`bittern.quant.ternary_of_dense`)."""
    recovered = quant.ternary_of_dense(values)
    return None if recovered is None else TernaryWeight(*recovered)


# --- metadata ⇄ config --------------------------------------------------------------------------------


def rope_theta(config: dict[str, Any]) -> float:
    """``rope_theta`` of a Hugging Face config (transformers 5 keeps it in ``rope_parameters``)."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta)


def rope_scaling(config: dict[str, Any]) -> tuple[str, float] | None:
    """``(type, factor)`` of a linear rope scaling, None for none.

    Raises:
        ConfigError: a rope scaling other than ``default`` / ``linear`` (llama3, yarn, ... are not exported).
    """
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return ("linear", float(params.get("factor", 1.0)))
    raise ConfigError(f"rope scaling {kind!r} is not exported to GGUF (supported: default, linear)")


def head_dim(config: dict[str, Any]) -> int:
    """The attention head size of a Hugging Face config."""
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def config_from_metadata(fields: dict[str, Any], tensor_names: set[str], path: Path | None = None) -> dict[str, Any]:
    """The Hugging Face ``config.json`` content a GGUF file's metadata describes.

    Args:
        fields: GGUF key → Python value (strings, numbers, lists).
        tensor_names: the GGUF tensor names (an ``output.weight`` means an untied head; biases are detected).

    Raises:
        UnknownFormatError: an architecture other than llama / bitnet.
        CorruptCheckpointError: a required key is missing.
    """
    architecture = fields.get("general.architecture")
    model_type = {v: k for k, v in ARCHITECTURES.items()}.get(architecture)
    if model_type is None:
        raise UnknownFormatError(
            f"GGUF architecture {architecture!r} is not one bittern reads (known: {', '.join(ARCHITECTURES.values())})",
            path,
        )

    def need(key: str) -> Any:
        full = f"{architecture}.{key}"
        if full not in fields:
            raise CorruptCheckpointError(f"metadata key '{full}' is missing", path)
        return fields[full]

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    vocab = fields.get(f"{architecture}.vocab_size")
    if vocab is None:
        tokens = fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise CorruptCheckpointError(f"neither '{architecture}.vocab_size' nor a token list is present", path)
        vocab = len(tokens)
    rope = {"rope_type": "default", "rope_theta": float(fields.get(f"{architecture}.rope.freq_base", 10000.0))}
    if fields.get(f"{architecture}.rope.scaling.type") == "linear":
        rope = {**rope, "rope_type": "linear", "factor": float(fields[f"{architecture}.rope.scaling.factor"])}
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [HF_ARCHITECTURES[model_type]],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(fields.get(f"{architecture}.attention.head_count_kv", heads)),
        "head_dim": int(fields.get(f"{architecture}.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(fields.get(f"{architecture}.context_length", 2048)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_parameters": rope,
        "hidden_act": str(fields.get(KEY_HIDDEN_ACT, LLAMA_CPP_ACTIVATION[model_type])),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
    }
    if model_type == "llama":
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    for kind in ("bos", "eos", "pad"):
        value = fields.get(f"tokenizer.ggml.{kind}_token_id")
        if value is not None:
            config[f"{kind}_token_id"] = int(value)
    return config


# --- reading ------------------------------------------------------------------------------------------


def _field_value(field: Any) -> Any:
    """A ReaderField's value as Python (``gguf`` 0.19 ``ReaderField.contents``)."""
    return field.contents()


def read_gguf(path: str | Path, progress: bool | None = None) -> Checkpoint:
    """Read a llama / bitnet GGUF file into a :class:`Checkpoint`.

    TQ2_0 / TQ1_0 tensors become :class:`TernaryWeight` (exact codes, the fp16 scale, see
    :func:`ternary_from_blocks`); linear weights that bittern's exporter stored as Q8_0 / F16 (rows not a
    multiple of 256; listed in ``bittern.ternary_tensors``) are recovered as ternary too; F16 / BF16 tensors stay
    in their dtype and every other tensor is dequantized to a float32 dense tensor. q/k rows of the ``llama``
    architecture are put back into Hugging Face's order. The tokenizer is not converted (``Checkpoint.source`` is None).

    Raises:
        MissingFileError: no such file.
        CorruptCheckpointError: not a GGUF file, truncated, or a tensor that cannot be decoded (named).
        UnknownFormatError: an architecture or tensor bittern does not read.
    """
    gguf = gguf_module()
    path = Path(path)
    fields, tensors = _open_gguf(path)
    names = {t.name for t in tensors}
    config = config_from_metadata(fields, names, path)
    architecture = ARCHITECTURES[config["model_type"]]
    marked = set(fields.get(KEY_TERNARY) or [])
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}

    dense: dict[str, torch.Tensor] = {}
    ternary: dict[str, TernaryWeight] = {}
    linears: list[str] = []
    for tensor in _progress(tensors, progress):
        key = hf_tensor_name(tensor.name)
        if key is None:
            raise UnknownFormatError(
                f"tensor has no place in a Hugging Face {config['model_type']} model", path, tensor.name
            )
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ne is innermost-first
        type_name = tensor.tensor_type.name.lower()
        module, _, kind = key.rpartition(".")
        is_linear = kind == "weight" and module.split(".", 3)[-1] in LINEAR_MODULES
        try:
            if type_name in TERNARY_TYPE_NAMES and is_linear and len(shape) == 2:
                weight: TernaryWeight | None = ternary_from_blocks(tensor.data, type_name, shape, tensor.name, path)
                values = None
            else:
                values = _dense_values(gguf, tensor, shape)
                weight = recover_ternary(values) if tensor.name in marked and is_linear else None
                if tensor.name in marked and is_linear and weight is None:
                    raise CorruptCheckpointError(
                        "is listed as ternary but its values are not {-s, 0, s}", path, tensor.name
                    )
        except CheckpointError:
            raise
        except (ValueError, IndexError, TypeError, NotImplementedError) as exc:
            raise CorruptCheckpointError(f"cannot decode {type_name} data ({exc})", path, tensor.name) from exc
        parts = tensor.name.split(".")
        rope_heads = heads.get(parts[2]) if architecture == "llama" and parts[0] == "blk" else None
        if weight is not None:
            if rope_heads:
                weight = TernaryWeight(
                    permute_rope_rows(weight.codes, rope_heads, inverse=True),
                    permute_rope_rows(weight.scale, rope_heads, inverse=True) if weight.per_channel else weight.scale,
                )
            ternary[module] = weight
        else:
            assert values is not None
            if not bool(torch.isfinite(values).all()):
                raise NonFiniteWeightError("holds NaN or Inf", path, tensor.name)
            if rope_heads:
                values = permute_rope_rows(values, rope_heads, inverse=True)
            dense[key] = values
            if is_linear or module == "lm_head":
                linears.append(module)
    per_channel = any(w.per_channel for w in ternary.values())
    return Checkpoint(
        config=config,
        tensors=dense,
        ternary=ternary,
        latent_layers=[],
        dense_linear_layers=sorted(linears),
        per_channel=per_channel,
        layout=LAYOUT,
        format="gguf",
        source=None,
        files=dict.fromkeys([*dense, *(f"{m}.weight" for m in ternary)], path),
    )


def _open_gguf(path: Path) -> tuple[dict[str, Any], list[Any]]:
    """The metadata (key → value) and tensor list of the GGUF file ``path``, read with ``gguf.GGUFReader``.

    Raises:
        MissingFileError: no such file.
        CorruptCheckpointError: not a GGUF file, or truncated or corrupt (in words, see :func:`_unreadable`).
    """
    gguf = gguf_module()
    if not path.is_file():
        raise MissingFileError("GGUF file does not exist", path)
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {name: _field_value(field) for name, field in reader.fields.items()}
        tensors = list(reader.tensors)
    except (ValueError, IndexError, KeyError, OSError, TypeError, struct.error) as exc:
        raise CorruptCheckpointError(_unreadable(path), path) from exc
    return fields, tensors


def check_gguf_file(path: str | Path) -> None:
    """Check that ``path`` is a whole, readable GGUF file (its metadata and every tensor's extent) without decoding
    any tensor: the check :func:`read_gguf` starts with, for callers that read the file by other means first (the
    tokenizer stored in it, which transformers reads and whose errors are raw ``struct`` / numpy messages).

    Raises:
        MissingFileError: no such file.
        CorruptCheckpointError: not a GGUF file, or truncated or corrupt.
    """
    _open_gguf(Path(path))


def _unreadable(path: Path) -> str:
    """Why ``gguf.GGUFReader`` could not parse ``path``, in words (its own errors are numpy's reshape messages)."""
    size = path.stat().st_size
    if not is_gguf_file(path):
        return f"not a readable GGUF file: it does not start with the magic bytes 'GGUF' ({size:,} bytes)"
    return (
        f"not a readable GGUF file: truncated or corrupt ({size:,} bytes; its metadata or tensor data is cut short "
        "or damaged, e.g. an interrupted copy or download)"
    )


_EXACT_DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}
"""GGUF tensor types kept in their own dtype when read (every other type is dequantized to float32)."""


def _dense_values(gguf: Any, tensor: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """A non-ternary tensor's values, ``shape``: F16 and BF16 tensors in their own dtype (exact), every other type
    dequantized to float32, so that a conversion keeps the file's 16-bit tensors 16-bit."""
    qtype = tensor.tensor_type
    data = np.ascontiguousarray(tensor.data)
    values = torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32).reshape(shape))
    return values.to(_EXACT_DTYPES.get(qtype.name.lower(), torch.float32))


def _progress(items: list, show: bool | None) -> Any:
    if not (show if show is not None else len(items) > 64):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="reading GGUF", unit="tensor", leave=False)


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(4) == b"GGUF"
