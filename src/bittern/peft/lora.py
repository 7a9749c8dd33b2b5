"""LoRA on bittern models through PEFT: build the config, attach adapters, load saved ones, merge.

Adapters are PEFT's own: :func:`apply_lora` returns a ``peft.PeftModel``, ``save_pretrained`` writes PEFT's
``adapter_config.json`` + ``adapter_model.safetensors``, and stock PEFT loads them back once the packed layer's
LoRA class is registered on the config (:func:`register`; :func:`load_adapter` does it). PEFT does not store
custom-module registrations in ``adapter_config.json``, which is why loading goes through :func:`load_adapter`
(or ``PeftModel.from_pretrained(model, path, config=register(LoraConfig.from_pretrained(path)))``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from bittern.convert import ternary_layer_names
from bittern.errors import ConfigError, MissingFileError
from bittern.nn import BitLinear, TernaryLinear
from bittern.peft.layer import TernaryLoraLinear
from bittern.peft.merge import ROUNDINGS, merged_layer

ADAPTER_CONFIG = "adapter_config.json"


def register(config: LoraConfig) -> LoraConfig:
    """Register :class:`TernaryLoraLinear` for :class:`TernaryLinear` on ``config`` (in place; returns it), so
    ``get_peft_model`` / ``PeftModel.from_pretrained`` can wrap packed layers. BitLinear needs nothing: it is an
    ``nn.Linear`` and gets PEFT's ``lora.Linear``."""
    config._register_custom_module({TernaryLinear: TernaryLoraLinear})
    return config


def _short_names(names: Sequence[str]) -> list[str]:
    """Last name components, looking through PEFT's wrappers (``q_proj.base_layer`` is ``q_proj``)."""
    return sorted({name.replace(".base_layer", "").rsplit(".", 1)[-1] for name in names})


def resolve_targets(model: nn.Module, targets: Sequence[str] | None = None) -> list[str]:
    """The ``target_modules`` for ``model``: ``targets`` checked, or by default the distinct short names (``q_proj``,
    ``down_proj``, ...) of its ternary layers.

    A target matches a module named exactly so or ending in ``.target`` (PEFT's rule).

    Raises:
        ConfigError: the model has no ternary layer (default targets), a target matches no module, or a matched
            module is not a linear layer (TernaryLinear, BitLinear or nn.Linear).
    """
    modules = dict(model.named_modules())
    ternary = ternary_layer_names(model)
    if targets is None:
        if not ternary:
            raise ConfigError("the model has no ternary layers to adapt; load it with bittern.load_model")
        return _short_names(ternary)
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ConfigError("LoRA target modules: give at least one module name")
    available = ", ".join(
        _short_names(ternary) or _short_names([n for n, m in modules.items() if isinstance(m, nn.Linear)])
    )
    for target in targets:
        matched = [n for n in modules if n == target or n.endswith(f".{target}")]
        if not matched:
            raise ConfigError(
                f"LoRA target module {target!r} matches no module of the model; its ternary layers are: {available}"
            )
        for name in matched:
            if not isinstance(modules[name], (nn.Linear, TernaryLinear, LoraLayer)):
                raise ConfigError(
                    f"LoRA target module {target!r} matches '{name}', a {type(modules[name]).__name__}: "
                    "only linear layers (TernaryLinear, BitLinear, nn.Linear) take adapters"
                )
    return list(targets)


def lora_config(
    model: nn.Module,
    rank: int = 16,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    dropout: float = 0.0,
    **options,
) -> LoraConfig:
    """A registered :class:`peft.LoraConfig` for ``model``.

    Args:
        rank: LoRA rank ``r`` (>= 1).
        alpha: ``lora_alpha``; the update is scaled by ``alpha / rank``. Default ``2 * rank``.
        targets: module names (see :func:`resolve_targets`); default every ternary layer.
        dropout: dropout on the adapter input, in [0, 1).
        options: further ``LoraConfig`` fields (``lora_bias``, ``use_rslora``, ``init_lora_weights``, ...).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = 2.0 * rank if alpha is None else alpha
    if not alpha > 0:
        raise ConfigError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"LoRA dropout must lie in [0, 1), got {dropout!r}")
    if options.get("use_dora"):
        raise ConfigError("DoRA needs a dense base weight; bittern's packed layers support plain LoRA only")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=resolve_targets(model, targets),
        lora_dropout=dropout,
        task_type="CAUSAL_LM",
        **options,
    )
    return register(config)


def apply_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    dropout: float = 0.0,
    adapter_name: str = "default",
    **options,
) -> PeftModel:
    """Attach trainable LoRA adapters to ``model`` (in place) and return the ``PeftModel``.

    ``model`` is a bittern model (packed TernaryLinear layers from ``bittern.load_model(path)``, or BitLinear);
    only the adapters train: the packed base stays bit-identical. Called on a ``PeftModel``, it adds another
    adapter called ``adapter_name``. See :func:`lora_config` for the arguments.
    """
    if isinstance(model, PeftModel):
        config = lora_config(model.get_base_model(), rank, alpha, targets, dropout, **options)
        model.add_adapter(adapter_name, config)
        return model
    config = lora_config(model, rank, alpha, targets, dropout, **options)
    return get_peft_model(model, config, adapter_name=adapter_name)


def load_adapter(
    model: nn.Module, path: str | Path, adapter_name: str = "default", is_trainable: bool = False
) -> PeftModel:
    """Load a PEFT adapter directory onto a bittern model (or add it to a ``PeftModel`` as ``adapter_name``).

    Several adapters can share one base: load the first onto the model, the others onto the returned
    ``PeftModel`` under their own names, and switch with ``peft_model.set_adapter(name)`` (or pick one per
    sequence with ``peft_model(..., adapter_names=[...])``). Each adapter costs only its ``A`` and ``B`` matrices.
    """
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        raise MissingFileError(f"no {ADAPTER_CONFIG}: not a PEFT adapter directory", path / ADAPTER_CONFIG)
    config = register(LoraConfig.from_pretrained(str(path)))
    config.inference_mode = not is_trainable
    if isinstance(model, PeftModel):
        # PEFT's load_adapter would read the config again, without the registration: add it registered first,
        # then load_adapter finds the adapter and only loads its weights
        model.add_adapter(adapter_name, config)
        model.load_adapter(str(path), adapter_name, is_trainable=is_trainable)
        if is_trainable:
            for name, parameter in model.named_parameters():
                if f".{adapter_name}." in name or name.endswith(f".{adapter_name}"):
                    parameter.requires_grad_(True)
        return model
    return PeftModel.from_pretrained(model, str(path), adapter_name, is_trainable=is_trainable, config=config)


def merge_lora(
    model: PeftModel,
    adapter_names: Sequence[str] | None = None,
    layers: str = "ternary",
    rounding: str = "nearest",
    seed: int = 0,
) -> nn.Module:
    """Fold adapters into the base and return the base model without PEFT wrappers.

    Each adapted ternary layer becomes the ternarization of its latent weight plus ``ΔW`` (the sum over
    ``adapter_names``, default the active adapters); see :mod:`bittern.peft.merge` for the rule. The
    ``PeftModel`` is consumed (its base model is modified in place), like PEFT's ``merge_and_unload``.

    Args:
        layers: ``ternary``: adapted ternary layers come back as packed TernaryLinear, and so does every other
            BitLinear of the model (deployment); ``bitlinear``: adapted layers come back as BitLinear holding the
            unrounded merged latent (what :func:`bittern.peft.heal` trains).
        rounding: ``nearest`` (default: the weight rule) or ``stochastic`` (packed layers: ``Wt/s_w + ΔW`` rounded
            stochastically at the layer's scale, the update kept in expectation); ``seed`` seeds it.
    """
    if layers not in ("ternary", "bitlinear"):
        raise ConfigError(f"merge_lora: layers must be 'ternary' or 'bitlinear', not {layers!r}")
    if rounding not in ROUNDINGS:
        raise ConfigError(f"merge_lora: rounding must be one of {', '.join(ROUNDINGS)}, not {rounding!r}")
    if rounding == "stochastic" and layers != "ternary":
        raise ConfigError("merge_lora: rounding='stochastic' rounds codes; layers='bitlinear' keeps latents unrounded")
    if not isinstance(model, PeftModel):
        raise ConfigError(f"merge_lora needs a peft.PeftModel, got a {type(model).__name__}")
    names = list(adapter_names) if adapter_names is not None else list(model.active_adapters)
    unknown = [a for a in names if a not in model.peft_config]
    if unknown:
        raise ConfigError(f"unknown adapter(s) {unknown}; the model has {sorted(model.peft_config)}")
    base = model.get_base_model()
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, module in list(base.named_modules()):
            if not isinstance(module, LoraLayer):
                continue
            module.unmerge()
            present = [a for a in names if a in module.lora_A]
            inner = module.get_base_layer()
            if not present:
                base.set_submodule(name, inner)
                continue
            delta = sum(module.get_delta_weight(a).to(torch.float32) for a in present)
            with_bias = [a for a in present if module.lora_bias[a]]
            bias_delta = (
                sum(module.lora_B[a].bias.float() * module.scaling[a] for a in with_bias) if with_bias else None
            )
            generator = None
            if rounding == "stochastic":
                device = delta.device
                generator = generators.setdefault(device, torch.Generator(device=device).manual_seed(seed))
            base.set_submodule(name, merged_layer(inner, delta, bias_delta, layers, rounding, generator))
    if layers == "ternary":
        from bittern.convert import to_ternary

        if any(isinstance(m, BitLinear) for m in base.modules()):
            to_ternary(base)
    base.requires_grad_(False)
    return base
