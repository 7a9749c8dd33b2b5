"""Tests of :mod:`bittern.convert`: layer selection policies and the nn.Linear ⇄ BitLinear ⇄ TernaryLinear surgery.

Every test runs on tiny random Hugging Face models (conftest: hidden 64, 2 decoder layers, vocab 256) of each
architecture in the ``arch`` fixture, plus a tiny GPT-2 for the unsupported-module path.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import tiny_config, tiny_model, token_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config

from bittern import packing, quant
from bittern.convert import (
    ConversionPolicy,
    select_layers,
    set_activation_quantization,
    ternary_layer_names,
    to_bitlinear,
    to_linear,
    to_ternary,
)
from bittern.errors import ConfigError, UnsupportedModuleError
from bittern.nn import BitLinear, TernaryLinear

PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
"""The seven linear layers of every decoder block, in module order."""

NUM_LAYERS = 2
"""Decoder blocks of the conftest models."""

EXTRA_NORMS = {
    "qwen3": ("self_attn.q_norm", "self_attn.k_norm"),
    "bitnet": ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"),
}
"""Norms inside the blocks that some architectures add to the usual input/post-attention norms."""

TIGHT = 1e-5
"""Relative error (‖Δ‖/‖ref‖) allowed where two paths compute the same numbers in a different float order."""


GPT2_CONV1D = (
    "transformer.h.0.attn.c_attn",
    "transformer.h.0.attn.c_proj",
    "transformer.h.0.mlp.c_fc",
    "transformer.h.0.mlp.c_proj",
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --- helpers ---------------------------------------------------------------------------------------------------


def block_layer_names(num_layers: int = NUM_LAYERS) -> list[str]:
    """The names the default policy must select, in module order."""
    return [f"model.layers.{i}.{p}" for i in range(num_layers) for p in PROJECTIONS]


def tokens() -> torch.Tensor:
    """A small token batch ``[2, 16]`` (enough to exercise every layer, cheap on 2 cores)."""
    return token_batch(batch=2, length=16)


def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The model's float32 logits on ``ids`` (default :func:`tokens`), without autograd."""
    ids = tokens() if ids is None else ids
    with torch.no_grad():
        return model(ids.to(model.device)).logits.float()


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    """‖value − reference‖ / ‖reference‖ in float64."""
    value, reference = value.double(), reference.double()
    return ((value - reference).norm() / reference.norm()).item()


def randomize_biases(model: nn.Module, std: float = 0.02, seed: int = 3) -> nn.Module:
    """Give every bias random values (HF initializes them to zero, which would make bias checks vacuous)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def exact_linear_names(model: nn.Module) -> list[str]:
    """Names of the modules whose type is exactly ``nn.Linear`` (not a subclass such as BitLinear)."""
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


def capture_inputs(model: nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``ids`` and return the input each named layer received."""
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen[name] = args[0].detach().clone()

        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def tiny_gpt2() -> nn.Module:
    """A one-block GPT-2, whose attention and MLP use transformers' ``Conv1D`` instead of ``nn.Linear``."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@functools.cache
def _llama_for_policies() -> nn.Module:
    """One shared llama model for the property test (only read, never converted)."""
    return tiny_model("llama")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Set torch's global default dtype inside the block, restoring the previous one afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# --- default policy --------------------------------------------------------------------------------------------


def test_default_policy_selects_exactly_the_block_linears(arch: str) -> None:
    model = tiny_model(arch)
    names = select_layers(model)
    assert names == block_layer_names()
    in_blocks = [n for n in exact_linear_names(model) if n.startswith("model.layers.")]
    assert names == in_blocks
    assert "lm_head" not in names
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)


def test_default_policy_never_selects_the_head_when_tied() -> None:
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert select_layers(model) == block_layer_names()
    to_ternary(to_bitlinear(model))
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_embeddings_head_and_norms_are_left_alone(arch: str) -> None:
    model = tiny_model(arch)
    kept = {
        name: (module, {k: v.detach().clone() for k, v in module.named_parameters(recurse=False)})
        for name, module in model.named_modules()
        if not isinstance(module, nn.Linear) and any(True for _ in module.parameters(recurse=False))
    } | {"lm_head": (model.lm_head, {"weight": model.lm_head.weight.detach().clone()})}
    expected_norms = [f"model.layers.{i}.{n}" for i in range(NUM_LAYERS) for n in EXTRA_NORMS.get(arch, ())]
    assert set(expected_norms) <= set(kept), "the architecture-specific norms must be among the kept modules"
    assert "model.embed_tokens" in kept and "model.norm" in kept

    to_ternary(to_bitlinear(model))

    for name, (module, params) in kept.items():
        assert model.get_submodule(name) is module, name
        assert not isinstance(module, (BitLinear, TernaryLinear)), name
        for key, value in params.items():
            assert torch.equal(getattr(module, key), value), f"{name}.{key} changed"


# --- to_bitlinear ----------------------------------------------------------------------------------------------


def test_to_bitlinear_shares_the_original_parameters(arch: str) -> None:
    model = tiny_model(arch)
    before = {n: model.get_submodule(n) for n in block_layer_names()}
    count = sum(p.numel() for p in model.parameters())
    returned = to_bitlinear(model)
    assert returned is model
    for name, old in before.items():
        new = model.get_submodule(name)
        assert isinstance(new, BitLinear) and new is not old, name
        assert new.weight is old.weight
        assert new.weight.data_ptr() == old.weight.data_ptr()
        assert new.bias is old.bias
        assert (new.in_features, new.out_features) == (old.in_features, old.out_features)
        assert new.lam == 1.0 and not new.per_channel and new.quantize_activations
        assert not new.training, "a layer of an eval model must stay in eval mode"
    assert sum(p.numel() for p in model.parameters()) == count, "conversion must not add or copy parameters"


def test_lam_zero_reproduces_the_original_model_exactly(arch: str) -> None:
    model = tiny_model(arch)
    reference = logits(model)
    to_bitlinear(model, ConversionPolicy(lam=0.0))
    assert all(model.get_submodule(n).lam == 0.0 for n in block_layer_names())
    assert torch.equal(logits(model), reference)


def test_lam_one_changes_the_output(arch: str) -> None:
    model = tiny_model(arch)
    reference = logits(model)
    to_bitlinear(model)
    assert rel_err(logits(model), reference) > 1e-2


# --- to_ternary ------------------------------------------------------------------------------------------------


def test_to_ternary_packs_codes_and_scales_of_the_latent_weights(arch: str) -> None:
    model = tiny_model(arch)
    latent = {n: model.get_submodule(n).weight.detach().clone() for n in block_layer_names()}
    to_bitlinear(model)
    assert to_ternary(model) is model
    for name, weight in latent.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, TernaryLinear), name
        n, k = weight.shape
        assert (layer.out_features, layer.in_features) == (n, k)
        assert layer.packed_weight.dtype == torch.uint8
        assert layer.packed_weight.shape == (packing.packed_rows(n), k)
        assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (1,)
        codes, scale = quant.ternarize(weight)
        assert torch.equal(layer.codes(), codes)
        assert torch.equal(layer.weight_scale, scale)
        assert int(packing.count_invalid(layer.packed_weight, n)) == 0


def test_each_ternary_layer_matches_its_bitlinear_on_the_same_input(arch: str) -> None:
    bit = to_bitlinear(tiny_model(arch))
    ternary = to_ternary(copy.deepcopy(bit))
    names = block_layer_names()
    inputs = capture_inputs(bit, names, tokens())
    with torch.no_grad():
        for name in names:
            x = inputs[name]
            assert rel_err(ternary.get_submodule(name)(x), bit.get_submodule(name)(x)) <= TIGHT, name


def test_ternary_logits_stay_close_to_bitlinear_eval(arch: str) -> None:
    bit = to_bitlinear(tiny_model(arch))
    ternary = to_ternary(copy.deepcopy(bit))
    reference = logits(bit)
    out = logits(ternary)
    assert rel_err(out, reference) <= 2e-2
    assert (out.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


def test_ternary_logits_match_bitlinear_eval(arch: str) -> None:
    """The fully quantized BitLinear computes from integers like TernaryLinear: identical logits."""
    bit = to_bitlinear(tiny_model(arch)).eval()
    ternary = to_ternary(copy.deepcopy(bit)).eval()
    ids = token_batch()
    assert rel_err(logits(ternary, ids), logits(bit, ids)) <= TIGHT
    assert torch.equal(logits(ternary, ids), logits(bit, ids))


def test_ternary_layer_is_bit_identical_to_bitlinear_eval() -> None:
    torch.manual_seed(0)
    bit = BitLinear(64, 32, bias=False).eval()
    ternary = TernaryLinear.from_bitlinear(bit)
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert torch.equal(ternary(x), bit(x))


def test_qwen2_biases_are_kept_exactly() -> None:
    model = randomize_biases(tiny_model("qwen2"))
    biased = [n for n in block_layer_names() if model.get_submodule(n).bias is not None]
    assert biased == [
        f"model.layers.{i}.self_attn.{p}" for i in range(NUM_LAYERS) for p in ("q_proj", "k_proj", "v_proj")
    ]
    original = {n: model.get_submodule(n).bias.detach().clone() for n in biased}
    assert all(bool(b.ne(0).any()) for b in original.values())

    to_bitlinear(model)
    bit = copy.deepcopy(model)
    to_ternary(model)

    for name, bias in original.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, TernaryLinear)
        assert layer.bias.dtype == bias.dtype
        assert torch.equal(layer.bias, bias), f"{name}.bias was altered"
        assert layer.bias.unique().numel() > 3, "bias must not be ternary-quantized"
    for name in set(block_layer_names()) - set(biased):
        assert model.get_submodule(name).bias is None
    assert rel_err(logits(model), logits(bit)) <= 2e-2


# --- to_linear -------------------------------------------------------------------------------------------------


def test_to_linear_from_bitlinear_gives_back_the_latent_parameters(arch: str) -> None:
    model = tiny_model(arch)
    reference = logits(model)
    to_bitlinear(model)
    latent = {n: (model.get_submodule(n).weight, model.get_submodule(n).bias) for n in block_layer_names()}
    assert to_linear(model) is model
    for name, (weight, bias) in latent.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear, name
        assert layer.weight is weight and layer.bias is bias
    assert ternary_layer_names(model) == []
    assert torch.equal(logits(model), reference)


def test_to_linear_from_ternary_gives_dense_wt_times_s(arch: str) -> None:
    model = randomize_biases(tiny_model(arch))
    to_bitlinear(model)
    no_act_quant = set_activation_quantization(copy.deepcopy(model), False)
    assert all(not m.quantize_activations for m in no_act_quant.modules() if isinstance(m, BitLinear))
    latent = {n: model.get_submodule(n).weight.detach().clone() for n in block_layer_names()}
    biases = {n: model.get_submodule(n).bias for n in block_layer_names()}
    biases = {n: None if b is None else b.detach().clone() for n, b in biases.items()}

    to_linear(to_ternary(model))

    for name, weight in latent.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear, name
        assert layer.weight.dtype == weight.dtype and layer.weight.shape == weight.shape
        assert torch.equal(layer.weight, quant.fake_quant_weight(weight))
        assert layer.weight.unique().numel() <= 3
        if biases[name] is None:
            assert layer.bias is None
        else:
            assert torch.equal(layer.bias, biases[name])
    assert ternary_layer_names(model) == []
    assert rel_err(logits(model), logits(no_act_quant)) <= TIGHT


# --- policies --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("include", "exclude", "projections"),
    [
        (("mlp",), (), ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
        ((), ("down_proj",), PROJECTIONS[:6]),
        (("mlp",), ("down_proj",), ("mlp.gate_proj", "mlp.up_proj")),
        ((r"\.(q|k|v)_proj$",), (), PROJECTIONS[:3]),
        (("self_attn", "up_proj"), ("k_proj", "o_proj"), ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")),
        ((), (".",), ()),
    ],
)
def test_include_exclude_policies(
    arch: str, include: tuple[str, ...], exclude: tuple[str, ...], projections: tuple[str, ...]
) -> None:
    model = tiny_model(arch)
    policy = ConversionPolicy(include=include, exclude=exclude)
    expected = [f"model.layers.{i}.{p}" for i in range(NUM_LAYERS) for p in PROJECTIONS if p in projections]
    assert select_layers(model, policy) == expected

    to_bitlinear(model, policy)
    assert ternary_layer_names(model) == expected
    untouched = set(block_layer_names()) - set(expected)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in untouched)
    assert type(model.lm_head) is nn.Linear

    to_ternary(model, policy)
    assert ternary_layer_names(model) == expected
    assert all(isinstance(model.get_submodule(n), TernaryLinear) for n in expected)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in untouched)


def test_to_ternary_without_policy_converts_exactly_the_bitlinear_layers() -> None:
    model = to_bitlinear(tiny_model("llama"), ConversionPolicy(include=("mlp",), exclude=("up_proj",)))
    chosen = ternary_layer_names(model)
    assert len(chosen) == 2 * NUM_LAYERS
    to_ternary(model)
    assert ternary_layer_names(model) == chosen
    assert all(isinstance(model.get_submodule(n), TernaryLinear) for n in chosen)
    assert sorted(exact_linear_names(model)) == sorted({*block_layer_names(), "lm_head"} - set(chosen))


def test_policy_can_select_a_single_block() -> None:
    model = tiny_model("llama")
    policy = ConversionPolicy(include=(r"^model\.layers\.1\.",))
    assert select_layers(model, policy) == block_layer_names()[len(PROJECTIONS) :]


@settings(max_examples=40, deadline=None)
@given(
    include=st.lists(st.sampled_from(["mlp", "self_attn", r"_proj$", r"\.0\.", "lm_head", "head", "q_", "zzz"])),
    exclude=st.lists(st.sampled_from(["down", r"\.1\.", "v_proj", "lm_", "zzz"])),
)
def test_policy_semantics_match_an_independent_oracle(include: list[str], exclude: list[str]) -> None:
    """include: any match selects (default: inside a block); exclude: any match drops; non-linears never."""
    model = _llama_for_policies()
    policy = ConversionPolicy(include=tuple(include), exclude=tuple(exclude))
    expected = []
    for name in exact_linear_names(model):
        chosen = any(re.search(p, name) for p in include) if include else name.startswith("model.layers.")
        if chosen and not any(re.search(p, name) for p in exclude):
            expected.append(name)
    assert select_layers(model, policy) == expected


def test_per_channel_policy(arch: str) -> None:
    model = tiny_model(arch)
    latent = {n: model.get_submodule(n).weight.detach().clone() for n in block_layer_names()}
    per_tensor = to_ternary(to_bitlinear(tiny_model(arch)))

    to_bitlinear(model, ConversionPolicy(per_channel=True))
    assert all(model.get_submodule(n).per_channel for n in latent)
    bit = copy.deepcopy(model)
    to_ternary(model)

    for name, weight in latent.items():
        layer = model.get_submodule(name)
        assert layer.per_channel
        codes, scale = quant.ternarize(weight, per_channel=True)
        assert layer.weight_scale.shape == (weight.shape[0],)
        assert torch.equal(layer.weight_scale, scale)
        assert torch.equal(layer.codes(), codes)
    assert rel_err(logits(model), logits(bit)) <= 2e-2
    assert rel_err(logits(model), logits(per_tensor)) > 1e-3, "per-channel scales must change the model"


def test_per_channel_policy_direct_to_ternary() -> None:
    model = tiny_model("llama")
    weight = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    to_ternary(model, ConversionPolicy(per_channel=True))
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, TernaryLinear)
    assert torch.equal(layer.weight_scale, quant.weight_scale(weight, per_channel=True))


def test_explicit_include_converts_lm_head(arch: str) -> None:
    model = tiny_model(arch)
    head = model.lm_head
    policy = ConversionPolicy(include=(r"^lm_head$",))
    assert select_layers(model, policy) == ["lm_head"]

    to_bitlinear(model, policy)
    assert isinstance(model.lm_head, BitLinear) and model.lm_head.weight is head.weight
    assert model.get_output_embeddings() is model.lm_head
    assert ternary_layer_names(model) == ["lm_head"]
    assert all(type(model.get_submodule(n)) is nn.Linear for n in block_layer_names())

    to_ternary(model)
    assert isinstance(model.lm_head, TernaryLinear)
    vocab, hidden = head.weight.shape
    assert model.lm_head.packed_weight.shape == (packing.packed_rows(vocab), hidden)
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"include": ("(",)}, "include"),
        ({"exclude": ("[a-",)}, "exclude"),
        ({"include": ("mlp", "*bad")}, "*bad"),
        ({"include": "mlp"}, "string"),
        ({"exclude": "down_proj"}, "string"),
        ({"lam": 1.5}, "lam"),
        ({"lam": -0.1}, "lam"),
    ],
)
def test_bad_policies_raise_config_error(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        ConversionPolicy(**kwargs)


# --- idempotence -----------------------------------------------------------------------------------------------


def test_to_bitlinear_twice_is_a_no_op(arch: str) -> None:
    model = to_bitlinear(tiny_model(arch))
    first = {n: model.get_submodule(n) for n in block_layer_names()}
    reference = logits(model)
    to_bitlinear(model, ConversionPolicy(lam=0.0, per_channel=True))
    for name, module in first.items():
        assert model.get_submodule(name) is module, name
        assert module.lam == 1.0 and not module.per_channel
    assert torch.equal(logits(model), reference)


def test_to_ternary_twice_is_a_no_op(arch: str) -> None:
    model = to_ternary(to_bitlinear(tiny_model(arch)))
    first = {n: (model.get_submodule(n), model.get_submodule(n).packed_weight) for n in block_layer_names()}
    reference = logits(model)
    to_ternary(model)
    for name, (module, packed) in first.items():
        assert model.get_submodule(name) is module, name
        assert module.packed_weight is packed
    assert torch.equal(logits(model), reference)


def test_to_ternary_directly_from_plain_model_twice() -> None:
    model = to_ternary(tiny_model("llama"))
    first = {n: model.get_submodule(n) for n in block_layer_names()}
    assert all(isinstance(m, TernaryLinear) for m in first.values())
    reference = logits(model)
    to_ternary(model)
    assert all(model.get_submodule(n) is m for n, m in first.items())
    assert torch.equal(logits(model), reference)


def test_to_ternary_twice_after_a_partial_policy_is_a_no_op() -> None:
    model = tiny_model("llama")
    to_ternary(to_bitlinear(model, ConversionPolicy(include=("mlp",))))
    first = ternary_layer_names(model)
    assert len(first) == 3 * NUM_LAYERS
    reference = logits(model)
    to_ternary(model)
    assert ternary_layer_names(model) == first
    assert torch.equal(logits(model), reference)


def test_ternary_to_bitlinear_to_ternary_round_trip(arch: str) -> None:
    model = to_ternary(to_bitlinear(tiny_model(arch)))
    packed = {
        n: (model.get_submodule(n).codes(), model.get_submodule(n).weight_scale.clone()) for n in block_layer_names()
    }
    to_bitlinear(model)
    assert all(isinstance(model.get_submodule(n), BitLinear) for n in packed)
    to_ternary(model)
    for name, (codes, scale) in packed.items():
        layer = model.get_submodule(name)
        assert torch.equal(layer.codes(), codes), name
        torch.testing.assert_close(layer.weight_scale, scale, rtol=1e-6, atol=0)


# --- dtypes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_conversions_leave_the_default_dtype_alone(arch: str, dtype: torch.dtype) -> None:
    """The 'default dtype changed by conversion' defect: no conversion may touch torch's global default."""
    model = tiny_model(arch).to(dtype)
    assert torch.get_default_dtype() == torch.float32
    select_layers(model)
    assert torch.get_default_dtype() == torch.float32
    to_bitlinear(model)
    assert torch.get_default_dtype() == torch.float32
    assert all(model.get_submodule(n).weight.dtype == dtype for n in block_layer_names())
    to_ternary(model)
    assert torch.get_default_dtype() == torch.float32
    to_bitlinear(model)
    assert torch.get_default_dtype() == torch.float32
    to_ternary(model)
    assert torch.get_default_dtype() == torch.float32
    to_linear(model)
    assert torch.get_default_dtype() == torch.float32


def test_conversions_ignore_another_default_dtype() -> None:
    """Under a float64 default the converted layers keep the model's float32 and nothing becomes float64."""
    model = randomize_biases(tiny_model("qwen2"))
    with default_dtype(torch.float64):
        to_bitlinear(model)
        assert torch.get_default_dtype() == torch.float64
        to_ternary(model)
        assert torch.get_default_dtype() == torch.float64
        for name in block_layer_names():
            layer = model.get_submodule(name)
            assert layer.weight_scale.dtype == torch.float32
            assert layer.bias is None or layer.bias.dtype == torch.float32
        to_linear(model)
        assert torch.get_default_dtype() == torch.float64
    assert torch.get_default_dtype() == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_model_converts_and_runs(arch: str) -> None:
    model = randomize_biases(tiny_model(arch)).to(torch.bfloat16)
    to_bitlinear(model)
    for name in block_layer_names():
        assert model.get_submodule(name).weight.dtype == torch.bfloat16
    latent = {n: model.get_submodule(n).weight.detach().clone() for n in block_layer_names()}
    bit = copy.deepcopy(model)
    to_ternary(model)
    for name, weight in latent.items():
        layer = model.get_submodule(name)
        codes, scale = quant.ternarize(weight)  # from the bf16 values upcast to float32
        assert torch.equal(layer.codes(), codes)
        assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
        assert layer.bias is None or layer.bias.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(tokens()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out.float(), logits(bit)) <= 5e-2


def test_bf16_ternary_to_linear_stays_bf16_and_runs() -> None:
    model = to_ternary(to_bitlinear(tiny_model("llama").to(torch.bfloat16)))
    to_linear(model)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(tokens()).logits).all()


# --- meta and cuda ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_meta_model_converts(arch: str, dtype: torch.dtype) -> None:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype)
    assert torch.get_default_dtype() == torch.float32
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in block_layer_names()}
    weights = {n: model.get_submodule(n).weight for n in block_layer_names()}

    to_bitlinear(model)
    for name, weight in weights.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, BitLinear) and layer.weight is weight and layer.weight.is_meta

    to_ternary(model)
    assert torch.get_default_dtype() == torch.float32
    for name, (n, k) in shapes.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, TernaryLinear), name
        assert layer.packed_weight.is_meta and layer.packed_weight.dtype == torch.uint8
        assert layer.packed_weight.shape == (packing.packed_rows(n), k)
        assert layer.weight_scale.is_meta and layer.weight_scale.dtype == torch.float32
        assert layer.weight_scale.shape == (1,)
        if layer.bias is not None:
            assert layer.bias.is_meta and layer.bias.dtype == dtype and layer.bias.shape == (n,)
    assert (arch == "qwen2") == any(model.get_submodule(n).bias is not None for n in shapes)

    to_linear(model)
    for name, shape in shapes.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.is_meta and tuple(layer.weight.shape) == shape


@pytest.mark.gpu
@requires_cuda
def test_cuda_model_converts(arch: str) -> None:
    model = randomize_biases(tiny_model(arch)).cuda()
    to_bitlinear(model)
    assert all(model.get_submodule(n).weight.is_cuda for n in block_layer_names())
    assert torch.isfinite(logits(model)).all()
    to_ternary(model)
    assert torch.get_default_dtype() == torch.float32
    cpu = to_ternary(to_bitlinear(randomize_biases(tiny_model(arch))))
    for name in block_layer_names():
        layer, reference = model.get_submodule(name), cpu.get_submodule(name)
        assert isinstance(layer, TernaryLinear)
        assert layer.packed_weight.is_cuda and layer.weight_scale.is_cuda
        assert layer.weight_scale.dtype == torch.float32
        assert torch.equal(layer.packed_weight.cpu(), reference.packed_weight)
        torch.testing.assert_close(layer.weight_scale.cpu(), reference.weight_scale, rtol=1e-6, atol=0)
        if layer.bias is not None:
            assert layer.bias.is_cuda and torch.equal(layer.bias.cpu(), reference.bias)


@pytest.mark.gpu
@requires_cuda
def test_cuda_ternary_model_runs_and_matches_bitlinear(arch: str) -> None:
    bit = to_bitlinear(tiny_model(arch)).cuda()
    ternary = to_ternary(copy.deepcopy(bit))
    assert rel_err(logits(ternary), logits(bit)) <= 2e-2


@pytest.mark.gpu
@requires_cuda
def test_cuda_bf16_model_converts_and_runs() -> None:
    model = randomize_biases(tiny_model("qwen2")).to("cuda", torch.bfloat16)
    to_ternary(to_bitlinear(model))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, TernaryLinear) and layer.packed_weight.is_cuda
    assert layer.weight_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(tokens().cuda()).logits).all()


# --- unsupported modules ---------------------------------------------------------------------------------------


def test_gpt2_conv1d_is_rejected_with_its_name() -> None:
    model = tiny_gpt2()
    with pytest.raises(UnsupportedModuleError) as info:
        select_layers(model)
    message = str(info.value)
    assert "transformer.h.0.attn.c_attn" in message and "Conv1D" in message
    assert info.value.module_name == "transformer.h.0.attn.c_attn"
    assert isinstance(info.value, TypeError)
    with pytest.raises(UnsupportedModuleError, match=re.escape("transformer.h.0.attn.c_attn")):
        to_bitlinear(tiny_gpt2())
    with pytest.raises(UnsupportedModuleError, match="Conv1D"):
        to_ternary(tiny_gpt2())


def test_gpt2_error_names_the_next_unsupported_module() -> None:
    model = tiny_gpt2()
    with pytest.raises(UnsupportedModuleError, match=re.escape("'transformer.h.0.attn.c_proj'")):
        select_layers(model, ConversionPolicy(exclude=(r"c_attn$",)))


def test_gpt2_passes_when_conv1d_layers_are_excluded() -> None:
    model = tiny_gpt2()
    reference = logits(model, torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)))
    policy = ConversionPolicy(exclude=(r"\.c_attn$", r"\.c_proj$", r"\.c_fc$"))
    before = {n: model.get_submodule(n) for n in GPT2_CONV1D}
    assert select_layers(model, policy) == []
    assert to_bitlinear(model, policy) is model
    assert to_ternary(model, policy) is model
    assert ternary_layer_names(model) == []
    assert all(model.get_submodule(n) is m for n, m in before.items())
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(model, ids), reference)


def test_gpt2_head_can_be_converted_without_touching_conv1d() -> None:
    model = tiny_gpt2()
    policy = ConversionPolicy(include=(r"^lm_head$",))
    assert select_layers(model, policy) == ["lm_head"]
    to_ternary(to_bitlinear(model, policy))
    assert ternary_layer_names(model) == ["lm_head"]
    assert isinstance(model.lm_head, TernaryLinear)


# --- ternary_layer_names ---------------------------------------------------------------------------------------


def test_ternary_layer_names_follow_the_conversions(arch: str) -> None:
    model = tiny_model(arch)
    assert ternary_layer_names(model) == []
    to_bitlinear(model)
    assert ternary_layer_names(model) == block_layer_names()
    to_ternary(model, ConversionPolicy(include=("mlp",)))
    kinds = {n: type(model.get_submodule(n)) for n in ternary_layer_names(model)}
    assert list(kinds) == block_layer_names()
    assert {n for n, k in kinds.items() if k is TernaryLinear} == {n for n in kinds if ".mlp." in n}
    assert {n for n, k in kinds.items() if k is BitLinear} == {n for n in kinds if ".self_attn." in n}
    to_ternary(model)
    assert all(isinstance(model.get_submodule(n), TernaryLinear) for n in ternary_layer_names(model))
    assert ternary_layer_names(model) == block_layer_names()
    to_linear(model)
    assert ternary_layer_names(model) == []


def test_policy_for_layers_selects_exactly_the_named_layers() -> None:
    """Names are matched literally and whole: 'layers.1' never selects 'layers.11', dots are not wildcards."""
    model = tiny_model("llama", num_hidden_layers=12)
    names = ["model.layers.1.mlp.up_proj", "model.layers.0.self_attn.q_proj"]
    assert select_layers(model, ConversionPolicy.for_layers(names)) == names[::-1]  # module order
    assert select_layers(model, ConversionPolicy.for_layers(["model.layers.1.mlp"])) == []
    with pytest.raises(ConfigError, match="at least one"):
        ConversionPolicy.for_layers([])


def test_quantization_strength_is_set_in_one_place_and_validated() -> None:
    """set_quantization_strength sets λ of every BitLinear; λ outside [0, 1] is refused there and on a layer."""
    from bittern.convert import set_quantization_strength

    model = to_bitlinear(tiny_model("llama"))
    assert set_quantization_strength(model, 0.25) is model
    assert {m.lam for m in model.modules() if isinstance(m, BitLinear)} == {0.25}
    with pytest.raises(ValueError, match="lam must lie in"):
        set_quantization_strength(model, 1.5)
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="lam must lie in"):
        layer.lam = -0.1
    assert layer.lam == 0.25
