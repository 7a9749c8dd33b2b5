"""Models ⇄ checkpoints: build a Hugging Face model from any supported checkpoint, and save a model in any
bittern variant.

This is where the layouts of :mod:`bittern.formats` meet the layers of :mod:`bittern.nn`; the layouts
themselves know nothing about models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from bittern import formats, quant
from bittern.convert import (
    ConversionPolicy,
    select_layers,
    ternary_layer_names,
    to_bitlinear,
    to_linear,
    to_ternary,
)
from bittern.errors import CheckpointError, ConfigError, OutputExistsError, ShapeMismatchError, UnknownFormatError
from bittern.formats import Checkpoint, TernaryWeight
from bittern.formats.common import CONFIG_FILE, WEIGHTS_FILE, refuse_replacing
from bittern.nn import BitLinear, TernaryLinear

Layers = Literal["auto", "ternary", "bitlinear", "linear"]
SOURCE_ATTRIBUTE = "_bittern_source"
"""Attribute set on loaded models: the directory they came from (tokenizer files are copied from it)."""


def _ternary_weight(module: nn.Module) -> TernaryWeight:
    if isinstance(module, TernaryLinear):
        scale = module.weight_scale.detach().clone()
        return TernaryWeight(None, scale, packed=module.packed_weight.detach(), out_features=module.out_features)
    codes, scale = quant.ternarize(module.weight, per_channel=module.per_channel)
    return TernaryWeight(codes, scale)


def _latent_weight(module: nn.Module) -> torch.Tensor:
    if isinstance(module, TernaryLinear):
        return module.to_bitlinear(dtype=torch.float32).weight.detach()
    return module.weight.detach()


def _drop_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one key of tensors that are the very same view (tied embeddings); the loader re-ties them.

    Views are the same when storage, offset, shape and strides all match; other tensors that merely share
    a buffer are copied, so safetensors can store them.
    """
    seen: set[tuple] = set()
    storages: set[int] = set()
    kept = {}
    for key, tensor in state.items():
        if tensor.device.type == "meta":
            kept[key] = tensor
            continue
        pointer = tensor.untyped_storage().data_ptr()
        ident = (pointer, tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if ident in seen:
            continue
        seen.add(ident)
        kept[key] = tensor.clone() if pointer in storages else tensor
        storages.add(pointer)
    return kept


def checkpoint_from_model(model: nn.Module, target: Literal["ternary", "latent"] = "ternary") -> Checkpoint:
    """Describe a live model as a :class:`Checkpoint`.

    Args:
        model: a Hugging Face causal LM with :class:`BitLinear` and/or :class:`TernaryLinear` layers.
        target: ``ternary``: every ternary layer as codes + scale (BitLinear layers are ternarized in float32
            from their latent weights); ``latent``: every ternary layer as a latent weight (packed layers get
            the latent that reproduces their codes and scale).
    """
    ternary_modules = {n: m for n, m in model.named_modules() if isinstance(m, (BitLinear, TernaryLinear))}
    dense_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, BitLinear)]
    state = dict(model.state_dict())
    ternary: dict[str, TernaryWeight] = {}
    latent: list[str] = []
    for name, module in ternary_modules.items():
        state.pop(f"{name}.packed_weight", None)
        state.pop(f"{name}.weight_scale", None)
        if target == "ternary":
            state.pop(f"{name}.weight", None)
            ternary[name] = _ternary_weight(module)
        else:
            state[f"{name}.weight"] = _latent_weight(module)
            latent.append(name)
    config = model.config.to_dict()
    for key in ("quantization_config", "bittern", "_name_or_path"):
        config.pop(key, None)
    per_channel = any(getattr(m, "per_channel", False) for m in ternary_modules.values())
    return Checkpoint(
        config=config,
        tensors=_drop_shared(state),
        ternary=ternary,
        latent_layers=latent,
        dense_linear_layers=dense_linears,
        per_channel=per_channel,
        layout="model",
        source=model_source(model),
    )


def model_source(model: nn.Module) -> Path | None:
    """The directory ``model`` was loaded from, when known: where :func:`load_model` read it, else the local
    directory ``from_pretrained`` took (``config._name_or_path``); None for a model built in memory."""
    source = getattr(model, SOURCE_ATTRIBUTE, None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    return Path(source) if source and Path(source).is_dir() else None


def save_model(
    model: nn.Module,
    destination: str | Path,
    variant: str = "packed",
    *,
    scale_convention: str = "divide",
    dtype: torch.dtype | None = None,
    allow_padded_rows: bool = False,
    tokenizer_source: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` as one of bittern's variants, atomically.

    Args:
        variant: ``packed`` (Hugging Face bitnet layout, loadable by stock transformers), ``bf16`` (dense
            ``Wt / s_w``), or ``prequantized`` (latent weights, ready for training).
        scale_convention: ``divide`` (Falcon-E / ``bitlinear``) or ``multiply`` (2B4T / ``autobitlinear``),
            packed only.
        dtype: dtype of the dense tensors: for ``bf16``, bfloat16 (default), float16 or float32; for
            ``packed``, None keeps the model's (ternary scales are float32 in every case).
        allow_padded_rows: packed only: store layers with ``out_features % 4 != 0`` with ceil(N/4) byte rows
            (bittern loads them; stock transformers does not).
        tokenizer_source: directory whose tokenizer files are copied (default: where the model was loaded from).
        overwrite: replace an existing ``destination``.

    Raises:
        ConfigError: ``destination`` holds (as a parent) the directory the model was loaded from or
            ``tokenizer_source``: replacing it would delete them and all beside them. Saving over that directory
            itself is allowed (the new files are complete before it is replaced).
    """
    if variant not in formats.VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose one of {', '.join(formats.VARIANTS)}")
    for read in (model_source(model), tokenizer_source):
        refuse_replacing(destination, read, same_allowed=True)  # in place is fine: everything is staged first
    checkpoint = checkpoint_from_model(model, target="latent" if variant == "prequantized" else "ternary")
    if tokenizer_source is not None:
        checkpoint.source = Path(tokenizer_source)
    if variant == "packed":
        return formats.write_packed(checkpoint, destination, scale_convention, allow_padded_rows, overwrite, dtype)
    if variant == "bf16":
        return formats.write_bf16(checkpoint, destination, dtype or torch.bfloat16, overwrite)
    return formats.write_prequantized(checkpoint, destination, overwrite)


def _build_skeleton(checkpoint: Checkpoint, dtype: torch.dtype) -> nn.Module:
    """An uninitialised Hugging Face model for ``checkpoint.config`` (weights are loaded right after)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config_path = checkpoint.source / CONFIG_FILE if checkpoint.source else None
    values = dict(checkpoint.config)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise UnknownFormatError("config.json has no model_type", config_path)
    try:
        config = AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError) as exc:
        raise UnknownFormatError(f"transformers does not know model_type {model_type!r} ({exc})", config_path) from exc
    with no_init_weights():
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as exc:
            raise UnknownFormatError(f"{model_type!r} is not a causal language model ({exc})", config_path) from exc


def latent_layer_names(checkpoint: Checkpoint, policy: ConversionPolicy | None = None) -> list[str]:
    """The layers of ``checkpoint`` that hold latent ternary weights: its ``latent_layers``, or where those are left
    to the policy (online and Falcon-E prequantized layouts) the layers ``policy`` (default: the default policy)
    selects in the model its config describes, found on the meta device without loading a weight."""
    if checkpoint.latent_layers is not None:
        return list(checkpoint.latent_layers)
    with torch.device("meta"):
        model = _build_skeleton(checkpoint, torch.float32)
    return select_layers(model, policy)


def _install_ternary(model: nn.Module, checkpoint: Checkpoint) -> None:
    for name, weight in checkpoint.ternary.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise ShapeMismatchError(
                f"ternary layer '{name}' does not exist in the model config.json describes",
                checkpoint.files.get(f"{name}.weight"),
                f"{name}.weight",
            ) from exc
        if not isinstance(old, nn.Linear):
            raise ShapeMismatchError(f"'{name}' is a {type(old).__name__}, not a linear layer", None, f"{name}.weight")
        expected = (old.out_features, old.in_features)
        if weight.shape != expected:
            raise ShapeMismatchError(
                f"holds a [{weight.shape[0]}, {weight.shape[1]}] ternary matrix but the model's layer "
                f"is [{expected[0]}, {expected[1]}]",
                checkpoint.files.get(f"{name}.weight"),
                f"{name}.weight",
            )
        if weight.scale.numel() not in (1, old.out_features):
            raise ShapeMismatchError(
                f"scale has {weight.scale.numel()} values; expected 1 or {old.out_features}",
                checkpoint.files.get(f"{name}.weight_scale"),
                f"{name}.weight_scale",
            )
        layer = TernaryLinear.from_packed(weight.packed, weight.shape[0], weight.scale, bias=None)
        if old.bias is not None:
            layer.bias = nn.Parameter(torch.zeros_like(old.bias), requires_grad=False)
        model.set_submodule(name, layer)


def _load_dense(model: nn.Module, checkpoint: Checkpoint) -> None:
    own = model.state_dict()
    ternary_buffers = {f"{n}.{b}" for n in checkpoint.ternary for b in ("packed_weight", "weight_scale")}
    for key, tensor in checkpoint.tensors.items():
        if key not in own:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            raise CheckpointError(
                "tensor is not part of the model config.json describes", checkpoint.files.get(key), key
            )
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ShapeMismatchError(
                f"shape {list(tensor.shape)} does not match the model's {list(own[key].shape)}",
                checkpoint.files.get(key),
                key,
            )
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_keys = {f"{n}.weight" for n, m in model.named_modules() if head is not None and m is head}
    missing = [
        k
        for k in own
        if k not in checkpoint.tensors
        and k not in ternary_buffers
        and not (tied and k in head_keys)
        and not _is_non_persistent(model, k)
    ]
    if missing:
        source = checkpoint.source / WEIGHTS_FILE if checkpoint.source else None
        raise CheckpointError(f"{len(missing)} tensors are missing, e.g. {missing[:3]}", source)
    # assigned rather than copied (in the model's dtypes): the model holds the tensors read, one copy of each
    state = {k: v.to(own[k].dtype) for k, v in checkpoint.tensors.items() if k in own}
    with torch.no_grad():
        model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()


def _is_non_persistent(model: nn.Module, key: str) -> bool:
    module_name, _, buffer = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return buffer in getattr(module, "_non_persistent_buffers_set", set())


def model_from_checkpoint(
    checkpoint: Checkpoint,
    layers: Layers = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    policy: ConversionPolicy | None = None,
) -> nn.Module:
    """Build the Hugging Face model a :class:`Checkpoint` describes, with its ternary layers.

    Args:
        layers: ``auto`` (packed and bf16 checkpoints give :class:`TernaryLinear`, prequantized ones
            :class:`BitLinear`, plain ones stay plain), ``ternary``, ``bitlinear`` or ``linear`` (every
            ternary layer as a dense ``nn.Linear``; for packed checkpoints that is ``Wt / s_w``).
        dtype: dtype of the dense parameters (ternary scales stay float32).
        policy: which layers of a plain checkpoint become ternary (default policy if None).
    """
    if layers not in ("auto", "ternary", "bitlinear", "linear"):
        raise ConfigError(f"layers must be auto, ternary, bitlinear or linear, not {layers!r}")
    model = _build_skeleton(checkpoint, dtype)
    _install_ternary(model, checkpoint)
    _load_dense(model, checkpoint)
    if checkpoint.latent_layers is None:
        to_bitlinear(model, policy)
    elif checkpoint.latent_layers:
        to_bitlinear(model, ConversionPolicy.for_layers(checkpoint.latent_layers, checkpoint.per_channel))
    plain = checkpoint.layout == "hf-full"
    if layers == "ternary":
        to_ternary(model, policy if plain else None)
    elif layers == "bitlinear":
        if plain:
            to_bitlinear(model, policy)
        elif names := ternary_layer_names(model):
            to_bitlinear(model, ConversionPolicy.for_layers(names))
    elif layers == "linear":
        to_linear(model)
    if checkpoint.source is not None:
        setattr(model, SOURCE_ATTRIBUTE, str(checkpoint.source))
    return model.to(device).eval()


def load_model(
    path: str | Path,
    layers: Layers = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    policy: ConversionPolicy | None = None,
) -> nn.Module:
    """Load any supported checkpoint directory as a Hugging Face model with bittern layers.

    See :func:`bittern.formats.read_checkpoint` for the supported layouts and :func:`model_from_checkpoint`
    for ``layers``.
    """
    return model_from_checkpoint(formats.read_checkpoint(path), layers, dtype, device, policy)


def stored_dtype(checkpoint: Checkpoint) -> torch.dtype:
    """The floating dtype most of a checkpoint's dense values are stored in (float32 when it holds none)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in checkpoint.tensors.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    variant: str,
    *,
    scale_convention: str = "divide",
    dtype: torch.dtype | None = None,
    allow_padded_rows: bool = False,
    policy: ConversionPolicy | None = None,
    overwrite: bool = False,
    chat_template: str | None = None,
) -> Path:
    """``bittern convert``: read any supported checkpoint (a directory, or a GGUF file) and write it as ``variant``.

    A full-precision source is ternarized (layers chosen by ``policy``); codes and scales are computed in
    float32 from the weights as stored. The dense tensors keep the dtype they are stored in unless ``dtype`` says
    otherwise (the ``bf16`` variant: bfloat16 unless ``dtype``). Tokenizer files are copied from ``source``; a GGUF
    file's tokenizer is read from the file and saved. ``chat_template`` (a name of
    :data:`bittern.tokenization.CHAT_TEMPLATES` or a Jinja file) replaces the tokenizer's chat template in the output.
    """
    from bittern.tokenization import check_chat_template_spec, tokenizer_source

    if variant not in formats.VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose one of {', '.join(formats.VARIANTS)}")
    source, destination = Path(source), Path(destination)
    if destination.exists() and not overwrite:
        raise OutputExistsError(f"output '{destination}' already exists; pass --overwrite to replace it")
    refuse_replacing(destination, source)  # before any work; save_model checks again what it is given
    check_chat_template_spec(chat_template)
    layers: Layers = "bitlinear" if variant == "prequantized" else "ternary"
    checkpoint = formats.read_checkpoint(source)
    if policy is not None and (policy.include or policy.exclude) and checkpoint.layout != "hf-full":
        raise ConfigError(f"--include / --exclude choose which layers of a full-precision model become ternary; "
                          f"'{source}' is already ternary ({checkpoint.layout}), and its layers are kept as they "
                          "are")  # fmt: skip
    if dtype is None and variant == "packed":
        dtype = stored_dtype(checkpoint)
    model = model_from_checkpoint(checkpoint, layers=layers, dtype=torch.float32, policy=policy)
    del checkpoint
    with tokenizer_source(source, chat_template) as tokenizers:
        return save_model(
            model,
            destination,
            variant,
            scale_convention=scale_convention,
            dtype=dtype,
            allow_padded_rows=allow_padded_rows,
            tokenizer_source=tokenizers,
            overwrite=overwrite,
        )
