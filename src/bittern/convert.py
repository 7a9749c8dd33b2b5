"""Model surgery on any Hugging Face causal LM: ``nn.Linear`` ⇄ :class:`BitLinear` ⇄ :class:`TernaryLinear`.

A :class:`ConversionPolicy` chooses which layers become ternary. The default is every ``nn.Linear`` inside
the decoder blocks (the items of the model's ``nn.ModuleList``\\ s), never embeddings, the LM head or norms.
Conversion happens in place, shares parameters instead of copying them (so it works on meta, cpu and cuda
tensors alike), never touches torch's global default dtype, and is idempotent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from bittern import quant
from bittern.errors import ConfigError, UnsupportedModuleError
from bittern.nn import BitLinear, TernaryLinear


@dataclass(frozen=True)
class ConversionPolicy:
    """Which linear layers become ternary, and how.

    Attributes:
        include: regular expressions searched (``re.search``) in module names; a layer is a candidate if any
            matches. Empty: every linear layer inside the decoder blocks.
        exclude: regular expressions; a matching layer is never converted (applied after ``include``).
        per_channel: one weight scale per output row instead of one per tensor.
        lam: initial quantization strength λ of new :class:`BitLinear` layers.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    per_channel: bool = False
    lam: float = 1.0

    def __post_init__(self) -> None:
        for kind, patterns in (("include", self.include), ("exclude", self.exclude)):
            if isinstance(patterns, str):
                raise ConfigError(f"ConversionPolicy.{kind} must be a tuple of patterns, not the string {patterns!r}")
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"ConversionPolicy.{kind}: invalid pattern {pattern!r}: {exc}") from exc
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"ConversionPolicy.lam must lie in [0, 1], got {self.lam}")

    @classmethod
    def for_layers(cls, names: Iterable[str], per_channel: bool = False, lam: float = 1.0) -> ConversionPolicy:
        """A policy that selects exactly the modules called ``names`` (at least one)."""
        patterns = tuple(f"^{re.escape(name)}$" for name in names)
        if not patterns:
            raise ConfigError("ConversionPolicy.for_layers needs at least one layer name")
        return cls(include=patterns, per_channel=per_channel, lam=lam)

    def wants(self, name: str, in_block: bool) -> bool:
        """Whether the layer called ``name`` is converted (``in_block``: it lies inside a decoder block)."""
        chosen = any(re.search(p, name) for p in self.include) if self.include else in_block
        return chosen and not any(re.search(p, name) for p in self.exclude)


DEFAULT_POLICY = ConversionPolicy()

_LINEAR_TYPES = (nn.Linear, TernaryLinear)


def _block_prefixes(model: nn.Module) -> list[str]:
    """Names of the items of every ``nn.ModuleList`` (the decoder blocks of a transformer), with a dot."""
    prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            prefixes.extend(f"{name}.{i}." if name else f"{i}." for i in range(len(module)))
    return prefixes


def _output_embedding_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def _looks_like_weight_layer(module: nn.Module) -> bool:
    """A module with its own weight matrix that is not a linear layer (e.g. GPT-2's Conv1D, nn.Conv1d)."""
    weight = module._parameters.get("weight")
    return (
        weight is not None
        and weight.dim() >= 2
        and not isinstance(module, (*_LINEAR_TYPES, nn.Embedding, nn.EmbeddingBag))
    )


def select_layers(model: nn.Module, policy: ConversionPolicy | None = None) -> list[str]:
    """Names of the layers ``policy`` converts, in module order.

    Raises:
        UnsupportedModuleError: a selected layer is not an ``nn.Linear`` (GPT-2's ``Conv1D``, say).
    """
    policy = policy or DEFAULT_POLICY
    prefixes = _block_prefixes(model)
    heads = _output_embedding_names(model)
    selected = []
    for name, module in model.named_modules():
        in_block = any(name.startswith(p) for p in prefixes)
        linear = isinstance(module, _LINEAR_TYPES)
        if not (linear or _looks_like_weight_layer(module)):
            continue
        if name in heads and not policy.include:
            continue
        if not policy.wants(name, in_block):
            continue
        if not linear:
            raise UnsupportedModuleError(
                name,
                f"{type(module).__module__}.{type(module).__qualname__}",
                "rewrite it as nn.Linear first, or exclude it with ConversionPolicy(exclude=...)",
            )
        selected.append(name)
    return selected


def _replace(model: nn.Module, names: Iterable[str], make) -> nn.Module:
    for name in names:
        old = model.get_submodule(name)
        new = make(old)
        if new is not old:
            new.train(old.training)
            model.set_submodule(name, new)
    return model


def _dense_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's dense floating parameters (embeddings, norms), float32 if it has none."""
    for module in model.modules():
        if isinstance(module, TernaryLinear):
            continue
        for parameter in module.parameters(recurse=False):
            if parameter.is_floating_point():
                return parameter.dtype
    return torch.float32


def to_bitlinear(model: nn.Module, policy: ConversionPolicy | None = None) -> nn.Module:
    """Turn the layers ``policy`` selects into :class:`BitLinear` (in place; returns ``model``).

    Plain ``nn.Linear`` layers keep their weights as latent weights (shared, not copied); packed
    :class:`TernaryLinear` layers get latent weights whose fake quantization reproduces their codes and
    scale exactly; existing BitLinear layers are left as they are.
    """
    policy = policy or DEFAULT_POLICY
    dtype = _dense_dtype(model)

    def make(module: nn.Module) -> nn.Module:
        if isinstance(module, BitLinear):
            return module
        if isinstance(module, TernaryLinear):
            return module.to_bitlinear(dtype=dtype, lam=policy.lam)
        return BitLinear.from_linear(module, lam=policy.lam, per_channel=policy.per_channel)

    return _replace(model, select_layers(model, policy), make)


def ternary_layer_names(model: nn.Module) -> list[str]:
    """Names of the :class:`BitLinear` and :class:`TernaryLinear` layers of ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, (BitLinear, TernaryLinear))]


def to_ternary(model: nn.Module, policy: ConversionPolicy | None = None) -> nn.Module:
    """Turn layers into packed :class:`TernaryLinear` (in place; returns ``model``).

    Without ``policy``: every :class:`BitLinear` of the model, or, if it has no ternary layer at all, the
    layers the default policy selects. With ``policy``: the layers it selects. Codes and scales come from
    float32 arithmetic on the weights as stored.
    """
    if policy is None and any(isinstance(m, (BitLinear, TernaryLinear)) for m in model.modules()):
        names = [name for name, m in model.named_modules() if isinstance(m, BitLinear)]
        per_channel = None
    else:
        names = select_layers(model, policy)
        per_channel = (policy or DEFAULT_POLICY).per_channel

    def make(module: nn.Module) -> nn.Module:
        if isinstance(module, TernaryLinear):
            return module
        return TernaryLinear.from_bitlinear(module, per_channel=per_channel)

    return _replace(model, names, make)


def to_linear(model: nn.Module) -> nn.Module:
    """Turn every ternary layer back into a plain ``nn.Linear`` (in place; returns ``model``).

    :class:`BitLinear` gives back its latent weights (shared); :class:`TernaryLinear` gives ``Wt / s_w`` in
    the dtype of the model's dense parameters: the dense view that the bf16 variant stores.
    """
    dtype = _dense_dtype(model)

    def make(module: nn.Module) -> nn.Module:
        if isinstance(module, BitLinear):
            return module.to_linear()
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.dequantized_weight(dtype), requires_grad=True)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype).clone())
        return linear

    return _replace(model, ternary_layer_names(model), make)


def set_quantization_strength(model: nn.Module, lam: float) -> nn.Module:
    """Set λ (0 = full precision, 1 = fully ternary; a number in [0, 1], else ``ValueError``) of every
    :class:`BitLinear` in ``model`` (returns ``model``)."""
    lam = quant.check_lam(lam)
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.lam = lam
    return model


def set_activation_quantization(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch activation quantization of every :class:`BitLinear` on or off (returns ``model``).

    Off, the model computes what the bf16 variant computes: ternary weights on full-precision activations.
    """
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.quantize_activations = enabled
    return model
