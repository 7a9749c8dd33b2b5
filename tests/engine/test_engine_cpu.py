"""The engine on the CPU runs the native kernels (:mod:`bittern.kernels.cpu`): packed products, the fused norms, the
decode step's attention and the 16-bit LM head — with the numbers of the PyTorch path it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import one_thread, tiny_model, token_batch
from engine_models import synthetic_tokens, tokenizer, trained_model

import bittern
from bittern import kernels
from bittern.engine import Engine
from bittern.kernels import cpu

pytestmark = [
    pytest.mark.skipif(not cpu.available(), reason="the native CPU kernels did not build here"),
    pytest.mark.usefixtures("single_thread"),
]

ENTRY_POINTS = ("packed_linear", "packed_linear_group", "packed_quantized", "rms_norm", "norm_linear", "relu2_mul",
                "decode_attention", "dense_linear")  # fmt: skip


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many times each native entry point ran during a test."""
    seen = dict.fromkeys(ENTRY_POINTS, 0)
    for name in ENTRY_POINTS:
        original = getattr(cpu, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(cpu, name, spy)
    return seen


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_on_the_native_attention_equal_the_masked_attention(dtype: torch.dtype, calls) -> None:
    """Padding, the causal limit and a sliding window, as the masked SDPA of the reference path sees them; the cache
    written with the same keys and values."""
    model = tiny_model("mistral", sliding_window=6, head_gain=4.0).to(dtype)
    bittern.to_bitlinear(model)
    bittern.to_ternary(model)
    decoder = Engine(model, max_seq_len=32).decoder
    prompts = token_batch(batch=3, length=10)
    pad = torch.tensor([0, 3, 7])
    caches = {name: decoder.new_cache(3) for name in ("reference", "auto")}
    with torch.inference_mode():
        for name, cache in caches.items():
            with kernels.use_backend(name):
                decoder.forward(prompts, decoder.slots[:10], pad, cache, 10)
        token = prompts[:, -1:]
        for slot in range(10, 16):
            slots = decoder.slots[slot : slot + 1]
            with kernels.use_backend("reference"):
                want = decoder.forward(token, slots, pad, caches["reference"], slot + 1)
            got = decoder.forward(token, slots, pad, caches["auto"], slot + 1)
            assert _relative_error(got, want) <= (1e-5 if dtype == torch.float32 else 2e-2)
            token = want[:, -1].argmax(-1, keepdim=True)
    assert calls["decode_attention"] == 6 * model.config.num_hidden_layers
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for layer in range(model.config.num_hidden_layers):
        for kind in ("keys", "values"):
            got, want = getattr(caches["auto"], kind)[layer], getattr(caches["reference"], kind)[layer]
            assert _relative_error(got[:, :, :16], want[:, :, :16]) <= tolerance


def test_a_bitnet_decode_step_runs_on_the_native_kernels(calls) -> None:
    """bf16: the prompt's forward on the dispatch (fused norms, grouped q/k/v and gate/up); each decode step on the
    direct path: every norm with the packed layers after it in one call (relu² and ffn_sub_norm with down_proj), the
    attention in one, the 16-bit LM head on the native GEMV for the one-row steps."""
    model = trained_model("bitnet").to(torch.bfloat16)
    engine = Engine(model, tokenizer(), max_batch=1, max_seq_len=64)
    prompt = synthetic_tokens(1, 9, seed=3)[0].tolist()
    engine.generate_ids([prompt], 5, ignore_eos=True)
    layers, steps = model.config.num_hidden_layers, 4  # the prompt, then 4 decode steps
    assert calls["rms_norm"] == 4 * layers + 1 + steps  # the prompt's norms, then each step's final norm
    assert calls["packed_linear_group"] == 2 * layers and calls["packed_linear"] == 2 * layers
    assert calls["norm_linear"] == steps * 4 * layers
    assert calls["decode_attention"] == steps * layers
    assert calls["dense_linear"] == 1 + steps  # the prompt's last token and every step: one row each
    assert calls["relu2_mul"] == 0  # inside norm_linear


def test_one_and_two_threads_generate_the_same_tokens() -> None:
    model = trained_model("bitnet")
    prompt = synthetic_tokens(1, 12, seed=4)[0].tolist()
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            engine = Engine(copy.deepcopy(model), max_batch=1, max_seq_len=64)
            results.append(engine.generate_ids([prompt], 16, ignore_eos=True).token_ids[0])
        finally:
            torch.set_num_threads(1)
    assert results[0] == results[1]


def test_the_reference_path_generates_the_same_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """BITTERN_CPU_KERNELS=0: every layer on PyTorch and bittern.quant; the same greedy continuation."""
    model = trained_model("bitnet")
    prompt = synthetic_tokens(1, 12, seed=5)[0].tolist()
    native = Engine(copy.deepcopy(model), max_batch=1, max_seq_len=64).generate_ids([prompt], 16, ignore_eos=True)
    monkeypatch.setenv(cpu.ENV, "0")
    with one_thread():
        plain = Engine(copy.deepcopy(model), max_batch=1, max_seq_len=64).generate_ids([prompt], 16, ignore_eos=True)
    assert native.token_ids == plain.token_ids


def test_weights_move_onto_huge_pages_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine moves a CPU model's large weights into one huge-page block: same values, tied weights still tied,
    the same logits; BITTERN_HUGE_PAGES=0 leaves them."""
    from bittern.engine.engine import weights_on_huge_pages

    if not cpu.huge_pages_available():
        pytest.skip("no transparent huge pages here")
    model = trained_model("bitnet")
    before = {name: t.clone() for name, t in (*model.named_parameters(), *model.named_buffers())}
    ids = synthetic_tokens(2, 20, seed=6)
    expected = Engine(copy.deepcopy(model), max_seq_len=64).logits(ids)
    moved = weights_on_huge_pages(model, least=1024)
    assert moved > 0
    after = dict((*model.named_parameters(), *model.named_buffers()))
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(Engine(model, max_seq_len=64).logits(ids), expected)
    monkeypatch.setenv(cpu.HUGE_PAGES_ENV, "0")
    assert weights_on_huge_pages(trained_model("bitnet"), least=1024) == 0
