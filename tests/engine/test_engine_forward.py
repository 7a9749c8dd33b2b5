"""The engine's teacher-forced forward against the Hugging Face model it wraps: the issue's thresholds in float32
and bfloat16, left padding, every checkpoint variant bittern loads, the dense mode, architectures, errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, token_batch
from engine_models import save_variants, synthetic_tokens, trained_model

import bittern
from bittern.engine import Engine
from bittern.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def _argmax_agreement(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.argmax(-1) == ref.argmax(-1)).float().mean())


def _reference_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module", params=["llama", "bitnet"])
def trained(request) -> tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(arch, float32 TernaryLinear HF model, 8 x 96 tokens of its language, the HF model's float32 logits)."""
    model = trained_model(request.param)
    ids = synthetic_tokens(8, 96, seed=7)
    return request.param, model, ids, _reference_logits(model, ids)


def test_float32_logits_match_the_ternary_model(trained) -> None:
    _, model, ids, ref = trained
    # the predictions are confident (a meaningful argmax check): the top-1 beats the top-2 by a clear margin
    top2 = ref.topk(2, dim=-1).values
    assert float((top2[..., 0] - top2[..., 1]).median()) > 1.0
    out = Engine(copy.deepcopy(model), max_seq_len=128).logits(ids)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert _relative_error(out, ref) <= 1e-3
    assert _argmax_agreement(out, ref) >= 0.995


def test_bfloat16_logits_match_the_float32_ternary_model(trained) -> None:
    _, model, ids, ref = trained
    engine = Engine(copy.deepcopy(model).to(torch.bfloat16), max_seq_len=128)
    out = engine.logits(ids)
    assert out.dtype == torch.bfloat16
    assert _relative_error(out, ref) <= 2e-2
    assert _argmax_agreement(out, ref) >= 0.98


def test_left_padding_does_not_change_a_row(trained) -> None:
    _, model, ids, ref = trained
    engine = Engine(copy.deepcopy(model), max_seq_len=128)
    padded = torch.cat([torch.zeros(2, 5, dtype=torch.long), ids[:2, :40]], dim=1)
    mask = torch.cat([torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 40, dtype=torch.long)], dim=1)
    mask[1, :5] = 1  # row 1 is not padded: its five leading zeros are real tokens
    padded[1] = torch.cat([torch.zeros(5, dtype=torch.long), ids[1, :40]])
    out = engine.logits(padded, attention_mask=mask)
    assert _relative_error(out[0, 5:], ref[0, :40]) <= 1e-5
    assert _relative_error(out[1], _reference_logits(model, padded[1:2])[0]) <= 1e-5
    with pytest.raises(ConfigError, match="left padding"):
        engine.logits(padded, attention_mask=mask.flip(1))


@pytest.mark.parametrize("arch", ["llama", "bitnet", "mistral", "qwen2", "qwen3"])
def test_every_supported_architecture_matches_its_model(arch: str) -> None:
    model = tiny_model(arch, head_gain=4.0)
    bittern.to_bitlinear(model)
    bittern.to_ternary(model)
    ids = token_batch(batch=2, length=24)
    ref = _reference_logits(model, ids)
    out = Engine(model, max_seq_len=64).logits(ids)
    assert _relative_error(out, ref) <= 1e-5


def test_sliding_window_is_applied() -> None:
    model = tiny_model("mistral", sliding_window=8, head_gain=4.0)
    ids = token_batch(batch=2, length=24)
    ref = _reference_logits(model, ids)
    out = Engine(model, max_seq_len=64).logits(ids)
    assert _relative_error(out, ref) <= 1e-5


@pytest.fixture(scope="module")
def bitnet_variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_variants("bitnet", tmp_path_factory.mktemp("bitnet"))


@pytest.mark.parametrize("variant", ["packed", "packed-multiply", "bf16", "prequantized"])
def test_every_checkpoint_variant_loads_as_the_same_ternary_model(bitnet_variants, variant: str) -> None:
    model = trained_model("bitnet")
    ids = synthetic_tokens(2, 40, seed=3)
    engine = bittern.load(bitnet_variants[variant], device="cpu")
    assert engine.dtype == torch.float32 and engine.device.type == "cpu"
    assert engine.tokenizer is not None and len(engine.tokenizer) == model.config.vocab_size
    assert sum(isinstance(m, bittern.TernaryLinear) for m in engine.model.modules()) == 14
    assert engine.model.get_output_embeddings().weight is engine.model.get_input_embeddings().weight  # tied
    assert _relative_error(engine.logits(ids), _reference_logits(model, ids)) <= 1e-5


def test_a_bfloat16_bf16_variant_loads_close_to_the_model(bitnet_variants) -> None:
    """Its embeddings and norms were rounded to bfloat16 on export; the ternary codes and scales survive."""
    model = trained_model("bitnet")
    ids = synthetic_tokens(4, 64, seed=3)
    engine = bittern.load(bitnet_variants["bf16-bfloat16"], device="cpu")
    out, ref = engine.logits(ids), _reference_logits(model, ids)
    assert _relative_error(out, ref) <= 2e-2 and _argmax_agreement(out, ref) >= 0.98


def test_falcon_e_layout_loads(tmp_path: Path) -> None:
    """Falcon-E: a plain LlamaForCausalLM + a 'bitlinear' (divide) quantization config, untied head."""
    model = trained_model("llama")
    path = bittern.save_model(model, tmp_path / "falcon-e", "packed", scale_convention="divide")
    ids = synthetic_tokens(2, 40, seed=4)
    engine = bittern.load(path, device="cpu")
    assert engine.model.config.model_type == "llama" and engine.tokenizer is None
    assert _relative_error(engine.logits(ids), _reference_logits(model, ids)) <= 1e-5


def test_dense_weights_compute_the_bf16_variant(bitnet_variants) -> None:
    model = trained_model("bitnet")
    dense = bittern.to_linear(copy.deepcopy(model))  # nn.Linear holding Wt * s: no activation quantization
    ids = synthetic_tokens(2, 40, seed=5)
    engine = bittern.load(bitnet_variants["packed"], device="cpu", weights="dense")
    assert not any(isinstance(m, bittern.TernaryLinear) for m in engine.model.modules())
    out = engine.logits(ids)
    assert _relative_error(out, _reference_logits(dense, ids)) <= 1e-5
    assert _relative_error(out, _reference_logits(model, ids)) > 1e-4  # it is not the int8-activation model


def test_load_defaults_and_errors(bitnet_variants) -> None:
    engine = bittern.load(bitnet_variants["packed"], dtype="bfloat16", max_batch=3, max_seq_len=64)
    assert engine.dtype == torch.bfloat16 and engine.max_batch == 3 and engine.max_seq_len == 64
    assert engine.cache.keys[0].shape == (3, 2, 64, 16)
    assert engine.weight_bytes < sum(p.numel() * 4 for p in trained_model("bitnet").parameters())
    with pytest.raises(ConfigError, match="weights"):
        bittern.load(bitnet_variants["packed"], weights="int4")
    with pytest.raises(ConfigError, match="dtype"):
        bittern.load(bitnet_variants["packed"], dtype="int8")
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        bittern.load(bitnet_variants["packed"], max_seq_len=10_000)
    with pytest.raises(ConfigError, match="more than max_seq_len"):
        engine.logits(torch.zeros(1, 65, dtype=torch.long))


def test_unsupported_architecture_is_refused() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ConfigError, match="gpt2"):
        Engine(model)


@pytest.mark.skipif(not bittern.kernels.triton_available(), reason="needs Triton")
def test_decode_steps_on_the_attention_kernel_equal_the_masked_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """One token per row on the Triton backend goes through the decode attention kernel (interpreter here), which
    must see what the masked SDPA sees: padding, the causal limit and the sliding window."""
    from bittern import kernels

    calls = []
    kernel = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *args: calls.append(args) or kernel(*args))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel needs a GPU, or the interpreter on CPU
    model = tiny_model("mistral", sliding_window=6, head_gain=4.0).to(device)
    decoder = Engine(model, max_seq_len=32).decoder
    prompts = token_batch(batch=3, length=10).to(device)
    pad = torch.tensor([0, 3, 7], device=device)
    cache = decoder.new_cache(3)
    with torch.no_grad():
        decoder.forward(prompts, decoder.slots[:10], pad, cache, 10)
        token = prompts[:, -1:]
        for slot in range(10, 14):
            slots = decoder.slots[slot : slot + 1]
            with kernels.use_backend("reference"):
                want = decoder.forward(token, slots, pad, cache, slot + 1)
            with kernels.use_backend("triton"):
                got = decoder.forward(token, slots, pad, cache, slot + 1)
            assert _relative_error(got, want) <= 1e-5
            token = want[:, -1].argmax(-1, keepdim=True)
    assert len(calls) == 4 * model.config.num_hidden_layers


@pytest.mark.skipif(not bittern.kernels.triton_available(), reason="needs Triton")
@pytest.mark.parametrize("batch", [1, 3])
def test_dense_layers_of_a_few_rows_run_on_the_dense_kernel(monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    """On the Triton backend a dense model's layers run on :func:`bittern.kernels.dense_linear` where it applies:
    every projection and the LM head of a one-row decode step, the LM head alone for a few rows (its vocabulary is
    wide enough here: the threshold is lowered to the tiny model's), nothing past 16 rows. Same logits."""
    from bittern import kernels
    from bittern.kernels import dense

    calls = []
    kernel = kernels.dense_linear
    monkeypatch.setattr(kernels, "dense_linear", lambda x, w, *args: calls.append((x.shape[:-1], w.shape[0]))
                        or kernel(x, w, *args))  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("llama").to(device)
    vocab = model.config.vocab_size
    monkeypatch.setattr(dense, "FEW_ROWS_MIN_FEATURES", vocab)
    decoder = Engine(model, max_seq_len=32).decoder
    prompts = token_batch(batch=batch, length=10).to(device)
    pad = torch.zeros(batch, dtype=torch.long, device=device)
    with torch.no_grad():
        outputs = {}
        for name in ("reference", "triton"):
            with kernels.use_backend(name):
                cache = decoder.new_cache(batch)
                whole = decoder.forward(prompts, decoder.slots[:10], pad, cache, 10)
                last = decoder.forward(prompts, decoder.slots[:10], pad, cache, 10, last_only=True)
                step = decoder.forward(prompts[:, -1:], decoder.slots[10:11], pad, cache, 11)
                outputs[name] = (whole, last, step)
    for got, want in zip(outputs["triton"], outputs["reference"], strict=True):
        assert _relative_error(got, want) <= 1e-5
    # the whole prompt's head only at batch 1 (10 rows; 30 at batch 3 are too many), then the last tokens and the
    # decode step
    head_calls = [(1, 10)] * (batch == 1) + [(batch, 1)] * 2
    assert [rows for rows, width in calls if width == vocab] == head_calls
    projections = [rows for rows, width in calls if width != vocab]
    # one row: the decode step runs the 7 projections of every layer on the kernel (the prompt's rows are 10)
    assert projections == ([(1, 1)] * 7 * model.config.num_hidden_layers if batch == 1 else [])


@pytest.mark.skipif(not bittern.kernels.triton_available(), reason="needs Triton")
def test_prompt_forward_on_the_fused_norms_matches_the_model(trained, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the Triton backend (interpreter here) every norm of the prompt's forward is one fused kernel that also
    quantizes the input of the packed layers after it: the logits must still meet the float32 thresholds."""
    from bittern import kernels

    arch, model, ids, ref = trained
    quantizing = []
    fused = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda *args: quantizing.append(args[4]) or fused(*args))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels need a GPU, or the interpreter on CPU
    engine = Engine(copy.deepcopy(model).to(device), max_seq_len=128)
    with kernels.use_backend("triton"):
        out = engine.logits(ids[:2, :32].to(device)).cpu()
    assert _relative_error(out, ref[:2, :32]) <= 1e-3 and _argmax_agreement(out, ref[:2, :32]) >= 0.995
    norms_per_block = 4 if arch == "bitnet" else 2  # BitNet adds a norm before o_proj and before down_proj
    blocks = model.config.num_hidden_layers
    assert quantizing == ([True] * norms_per_block) * blocks + [False]  # the LM head is not packed
