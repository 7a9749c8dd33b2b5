"""``bittern export gguf``: a bittern-readable checkpoint → one GGUF file that llama.cpp loads and computes
as the same model.

What is written (with the PyPI ``gguf`` package's ``GGUFWriter``):

* architecture ``llama`` for Llama-style models (Llama, Falcon-E: q/k rows permuted for llama.cpp's
  interleaved rope) or ``bitnet`` for ``BitNetForCausalLM`` (``attn_sub_norm``, ``ffn_sub_norm``), with the
  shape, norm epsilon, rope base and linear rope scaling;
* the tokenizer (:mod:`bittern.export.gguf_vocab`), special tokens and the chat template;
* every ternary linear layer as ``--type`` (TQ2_0 by default; exact codes, the code value ``1 / s_w`` rounded to
  fp16);
* **row policy**: a GGUF row is a layer's input dimension ``K``; TQ1_0/TQ2_0 need ``K % 256 == 0``. Ternary
  layers whose ``K`` is not a multiple of 256 are stored as Q8_0 when ``K % 32 == 0`` (``{-v, 0, v}`` is
  exact up to Q8_0's fp16 block scale: ``127 * fp16(v / 127)``), otherwise as F16; one
  :class:`RowFallbackWarning` lists them all. The same rule applies to the embeddings' type;
* the token embedding, an untied LM head and any linear layer a policy left in full precision as ``--embeddings``
  (f16 by default); norms and biases as F32;
* ``bittern.hidden_act`` and ``bittern.ternary_tensors`` so :func:`bittern.formats.gguf.read_gguf` restores
  the model exactly.

llama.cpp's ``bitnet`` graph computes the feed-forward with SiLU and always uses the token embedding as the
LM head (``src/models/bitnet.cpp`` in llama-cpp-python 0.3.36). A relu² BitNet model (``hidden_act: relu2``,
like microsoft/bitnet-b1.58-2B-4T) would therefore load and compute a different model: the exporter refuses
it unless ``allow_activation_mismatch`` is given (see BENCHMARKS.md for what llama.cpp then computes).

The file is written beside the destination under a temporary name and renamed into place: a failure leaves
no partial output.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bittern.errors import ConfigError, OutputExistsError, UnknownFormatError
from bittern.export.gguf_vocab import add_vocab, load_hf_tokenizer, vocab_from_tokenizer
from bittern.formats import gguf as gguf_format
from bittern.formats.common import Checkpoint, TernaryWeight, read_config

WEIGHT_TYPES = ("tq2_0", "tq1_0", "q8_0", "f16")
"""``--type`` choices: the ternary types, and two dense references (for comparisons and benchmarks)."""
EMBEDDING_TYPES = ("f16", "f32", "bf16", "q8_0")


class RowFallbackWarning(UserWarning):
    """Some tensors' rows are not a multiple of the requested type's block; they were stored in another type."""


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote.

    Attributes:
        path: the GGUF file.
        size_bytes: its size.
        architecture: llama.cpp architecture name (``llama`` or ``bitnet``).
        weight_type: the requested type of the ternary layers.
        tensor_types: GGUF tensor name → stored type name (``tq2_0``, ``q8_0``, ``f16``, ``f32``, ...).
        fallbacks: GGUF tensor name → type used instead of the requested one (the row policy).
        ternary_tensors: GGUF names of the ternary layers.
    """

    path: Path
    size_bytes: int
    architecture: str
    weight_type: str
    tensor_types: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)
    ternary_tensors: list[str] = field(default_factory=list)

    def type_counts(self) -> dict[str, int]:
        """Number of tensors per stored type."""
        counts: dict[str, int] = {}
        for kind in self.tensor_types.values():
            counts[kind] = counts.get(kind, 0) + 1
        return counts


def stored_type(requested: str, row: int) -> str:
    """The row policy: ``requested`` if ``row`` (K) is a multiple of its block, else Q8_0 if a multiple of 32,
    else F16."""
    if row % gguf_format.block_size(requested) == 0:
        return requested
    if row % gguf_format.block_size("q8_0") == 0:
        return "q8_0"
    return "f16"


def check_architecture(config: dict[str, Any], source: Path, allow_activation_mismatch: bool = False) -> str:
    """The llama.cpp architecture for a Hugging Face config, after checking llama.cpp computes that model.

    Raises:
        UnknownFormatError: a ``model_type`` other than llama / bitnet.
        ConfigError: a model llama.cpp's graph would compute differently (relu² BitNet without
            ``allow_activation_mismatch``, a BitNet with an untied head or biases, another activation,
            an unsupported rope scaling).
    """
    where = source / "config.json" if source.is_dir() else source
    model_type = config.get("model_type")
    architecture = gguf_format.ARCHITECTURES.get(model_type)
    if architecture is None:
        raise UnknownFormatError(
            f"architecture {model_type!r} is not exported to GGUF; bittern writes Llama-style models (llama, "
            "Falcon-E) as llama.cpp 'llama' and BitNetForCausalLM as 'bitnet'",
            where,
        )
    activation = config.get("hidden_act", "silu")
    expected = gguf_format.LLAMA_CPP_ACTIVATION[model_type]
    if activation != expected and not (model_type == "bitnet" and allow_activation_mismatch):
        hint = (
            " Pass allow_activation_mismatch=True (--allow-activation-mismatch) to write it anyway; llama.cpp will "
            "then compute a different model (its perplexity is far worse, see BENCHMARKS.md). Run relu² BitNet "
            "models with bittern, or train the BitNet-style model with hidden_act='silu' to deploy it in llama.cpp."
            if model_type == "bitnet"
            else ""
        )
        raise ConfigError(
            f"{where}: hidden_act is {activation!r} but llama.cpp's '{architecture}' graph computes the "
            f"feed-forward with {expected!r} (llama-cpp-python 0.3.36), so the GGUF file would not compute this "
            f"model.{hint}"
        )
    if model_type == "bitnet":
        if not config.get("tie_word_embeddings", False):
            raise ConfigError(
                f"{where}: the BitNet model has an untied LM head, but llama.cpp's 'bitnet' graph always uses the "
                "token embedding as the head; only BitNet models with tie_word_embeddings=true are exported"
            )
        if config.get("attention_bias"):
            raise ConfigError(f"{where}: llama.cpp's 'bitnet' graph has no attention biases (attention_bias=true)")
        if gguf_format.head_dim(config) * config["num_attention_heads"] != config["hidden_size"]:
            raise ConfigError(f"{where}: llama.cpp's 'bitnet' graph needs num_attention_heads * head_dim == hidden")
    gguf_format.rope_scaling(config)  # raises on an unsupported scaling
    return architecture


@contextlib.contextmanager
def atomic_output_file(destination: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; rename it into place on success, delete it on failure."""
    if destination.exists() and not overwrite:
        raise OutputExistsError(f"output '{destination}' already exists; pass overwrite=True (--overwrite)")
    if destination.is_dir():
        raise OutputExistsError(f"output '{destination}' is a directory; give a file name such as model.gguf")
    destination.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name, created by the writer with the usual permissions (mkstemp would make it private)
    staging = destination.parent / f".{destination.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        yield staging
        os.replace(staging, destination)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def _ternary_checkpoint(source: Path) -> Checkpoint:
    """Every ternary layer of ``source`` as codes + scale (a plain checkpoint is ternarized by the default
    policy, as ``bittern convert`` does), plus the dense tensors."""
    from bittern.checkpoint import checkpoint_from_model, load_model

    model = load_model(source, layers="ternary", dtype=torch.float32)
    return checkpoint_from_model(model, target="ternary")


def _add_metadata(writer: Any, config: dict[str, Any], name: str, file_type: int) -> None:
    """The model's shape, rope and norm settings, file type and bittern's own keys."""
    import gguf

    from bittern import __version__

    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(gguf_format.rope_theta(config))
    dim = gguf_format.head_dim(config)
    writer.add_rope_dimension_count(dim)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_vocab_size(int(config["vocab_size"]))
    scaling = gguf_format.rope_scaling(config)
    if scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling[1])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(gguf_format.KEY_VERSION, __version__)
    writer.add_string(gguf_format.KEY_HIDDEN_ACT, str(config.get("hidden_act", "silu")))


def _file_type(weight_type: str) -> int:
    import gguf

    return int(gguf.LlamaFileType[f"MOSTLY_{weight_type.upper()}"])


@dataclass
class _Entry:
    """One tensor to write: GGUF name, stored type, the type asked for, and a TernaryWeight or dense tensor."""

    name: str
    kind: str
    requested: str
    payload: Any
    ternary: bool


def _plan(checkpoint: Checkpoint, architecture: str, weight_type: str, embeddings: str) -> list[_Entry]:
    """Every tensor to write, in file order, with its type chosen by the row policy (q/k rows already in
    llama.cpp's order). Ternary layers get ``weight_type``; 2-D dense tensors (embeddings, an untied head, a linear
    layer left in full precision) get ``embeddings``; 1-D tensors (norms, biases) F32."""
    config = checkpoint.config
    heads = {"q_proj": int(config["num_attention_heads"]), "k_proj": int(config.get("num_key_value_heads") or 0)}
    heads["k_proj"] = heads["k_proj"] or heads["q_proj"]
    entries: list[_Entry] = []

    def rope_heads(module: str) -> int | None:
        return heads.get(module.rsplit(".", 1)[-1]) if architecture == "llama" else None

    for module, weight in checkpoint.ternary.items():
        name = gguf_format.gguf_tensor_name(f"{module}.weight", architecture)
        if (n_head := rope_heads(module)) is not None:
            weight = TernaryWeight(
                gguf_format.permute_rope_rows(weight.codes, n_head),
                gguf_format.permute_rope_rows(weight.scale, n_head) if weight.per_channel else weight.scale,
            )
        entries.append(_Entry(name, stored_type(weight_type, weight.shape[1]), weight_type, weight, True))
    for key, tensor in checkpoint.tensors.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if architecture == "bitnet" and key == "lm_head.weight":
            continue  # tied (checked): llama.cpp's bitnet uses token_embd
        name = gguf_format.gguf_tensor_name(key, architecture)
        if (n_head := rope_heads(key.rsplit(".", 1)[0])) is not None:
            tensor = gguf_format.permute_rope_rows(tensor, n_head)
        if tensor.dim() == 2:
            entries.append(_Entry(name, stored_type(embeddings, tensor.shape[1]), embeddings, tensor, False))
        else:
            entries.append(_Entry(name, "f32", "f32", tensor, False))
    return sorted(entries, key=lambda entry: _file_rank(entry.name))


def _file_rank(name: str) -> tuple[int, int, str]:
    """Token embedding first, then blocks in numeric order, then the output tensors (llama.cpp's order)."""
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def export_gguf(
    source: str | Path,
    output: str | Path,
    weight_type: str = "tq2_0",
    embeddings: str = "f16",
    *,
    overwrite: bool = False,
    allow_activation_mismatch: bool = False,
    pre_tokenizer: str | None = None,
    progress: bool | None = None,
) -> GGUFExport:
    """Write the model at ``source`` as one GGUF file for llama.cpp.

    Args:
        source: any checkpoint directory bittern reads (packed, bf16, prequantized, Falcon-E / 2B4T style,
            or a plain Llama / BitNet model, which is ternarized by the default policy), with its tokenizer.
        output: the ``.gguf`` file to write.
        weight_type: type of the ternary layers: ``tq2_0`` (2.06 bits/weight, llama.cpp's fastest ternary
            kernel), ``tq1_0`` (1.69 bits/weight), or the dense references ``q8_0`` / ``f16``.
        embeddings: type of the token embedding, an untied head and any full-precision linear layer: ``f16``,
            ``f32``, ``bf16`` or ``q8_0``.
        overwrite: replace an existing ``output``.
        allow_activation_mismatch: write a relu² BitNet model under llama.cpp's SiLU ``bitnet`` graph anyway.
        pre_tokenizer: llama.cpp pre-tokenizer name, when bittern cannot detect it from ``tokenizer.json``.
        progress: show a progress bar (default: when there are more than 64 tensors).

    Returns:
        a :class:`GGUFExport`; tensors stored in a fallback type are listed in ``fallbacks`` and in one
        :class:`RowFallbackWarning`.

    Raises:
        ConfigError: bad arguments, a model llama.cpp would compute differently, an unsupported tokenizer.
        UnknownFormatError: an unsupported architecture.
        MissingFileError: a missing source or tokenizer.
        OutputExistsError: ``output`` exists and ``overwrite`` is False.
    """
    import gguf

    if weight_type not in WEIGHT_TYPES:
        raise ConfigError(f"weight type must be one of {', '.join(WEIGHT_TYPES)}, not {weight_type!r}")
    if embeddings not in EMBEDDING_TYPES:
        raise ConfigError(f"embeddings type must be one of {', '.join(EMBEDDING_TYPES)}, not {embeddings!r}")
    source, output = Path(source), Path(output)
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output '{output}' already exists; pass overwrite=True (--overwrite) to replace it")
    config = read_config(source)  # the cheap checks first: config, architecture, tokenizer; then the weights
    config = {k: v for k, v in config.items() if k not in ("quantization_config", "bittern")}
    architecture = check_architecture(config, source, allow_activation_mismatch)
    vocab = vocab_from_tokenizer(load_hf_tokenizer(source), int(config["vocab_size"]), pre_tokenizer)
    checkpoint = _ternary_checkpoint(source)
    if not checkpoint.ternary:
        raise ConfigError(f"'{source}' has no ternary layers to export")
    entries = _plan(checkpoint, architecture, weight_type, embeddings)
    fallbacks = {e.name: e.kind for e in entries if e.kind != e.requested}
    ternary_names = sorted(e.name for e in entries if e.ternary)

    with atomic_output_file(output, overwrite) as staging:
        writer = gguf.GGUFWriter(str(staging), architecture)
        try:
            _add_metadata(writer, checkpoint.config, source.name, _file_type(weight_type))
            writer.add_array(gguf_format.KEY_TERNARY, ternary_names)
            add_vocab(writer, vocab)
            for entry in _progress(entries, progress):
                if entry.ternary and entry.kind in gguf_format.TERNARY_TYPE_NAMES:
                    data = gguf_format.ternary_to_blocks(entry.payload, entry.kind, entry.name)
                elif entry.ternary:  # the row policy's fallback (or a dense reference type): codes * fp16(s)
                    data = gguf_format.dense_to_blocks(_dequantize(entry.payload), entry.kind)
                else:
                    data = gguf_format.dense_to_blocks(entry.payload, entry.kind)
                raw = gguf_format.quant_type(entry.kind) if data.dtype == np.uint8 else None
                writer.add_tensor(entry.name, data, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
        finally:
            writer.close()
    if fallbacks:
        rows = {e.name: _row_length(e.payload) for e in entries if e.name in fallbacks}
        warnings.warn(
            f"{len(fallbacks)} tensors have rows (the input dimension K) that are not a multiple of the "
            f"{weight_type}/{embeddings} block and were stored as Q8_0 (K % 32 == 0) or else F16: "
            f"{describe_tensors(fallbacks, rows)}",
            RowFallbackWarning,
            stacklevel=2,
        )
    return GGUFExport(
        path=output,
        size_bytes=output.stat().st_size,
        architecture=architecture,
        weight_type=weight_type,
        tensor_types={e.name: e.kind for e in entries},
        fallbacks=fallbacks,
        ternary_tensors=ternary_names,
    )


def _row_length(payload: Any) -> int:
    return int(payload.shape[1] if isinstance(payload, TernaryWeight) else payload.shape[-1])


def describe_tensors(types: dict[str, str], rows: dict[str, int]) -> str:
    """A compact listing of GGUF tensors and their types: the same tensor of consecutive blocks is written once,
    e.g. ``blk.0-29.attn_q.weight (K=576 → q8_0)``."""
    groups: dict[tuple[str, str, int], list[int]] = {}
    for name, kind in types.items():
        parts = name.split(".")
        block = int(parts[1]) if parts[0] == "blk" else -1
        pattern = ".".join(["blk", "{}", *parts[2:]]) if block >= 0 else name
        groups.setdefault((pattern, kind, rows.get(name, 0)), []).append(block)
    items = []
    for (pattern, kind, row), blocks in sorted(groups.items()):
        blocks.sort()
        if blocks[0] >= 0:
            spans: list[tuple[int, int]] = []
            for block in blocks:
                if spans and block == spans[-1][1] + 1:
                    spans[-1] = (spans[-1][0], block)
                else:
                    spans.append((block, block))
            pattern = pattern.format(",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans))
        items.append(f"{pattern} (K={row} → {kind})")
    return ", ".join(items)


def _dequantize(weight: TernaryWeight) -> torch.Tensor:
    """``codes * v`` in float32, ``v = 1 / s_w`` rounded to fp16 like the ternary types' block scale."""
    return weight.codes.to(torch.float32) * gguf_format.fp16_code_value(weight.scale).reshape(-1, 1)


def _progress(entries: list, show: bool | None) -> Any:
    if not (show if show is not None else len(entries) > 64):
        return entries
    from tqdm.auto import tqdm

    return tqdm(entries, desc="writing GGUF", unit="tensor", leave=False)
