"""The engine on a CUDA GPU: the graphed decode step against the eager one, and the issue's thresholds for the
bf16 engine against the float32 ternary model. Skipped without CUDA."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from engine_models import synthetic_tokens, tokenizer, trained_model

from bittern.engine import Engine
from bittern.engine.graphs import CudaGraphDecodeStep, EagerDecodeStep, rows_in_one_pass
from bittern.engine.prefill import CudaGraphPrefill, EagerPrefill

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _engine(arch: str, dtype: torch.dtype, cuda_graph: bool = True) -> Engine:
    model = trained_model(arch).to(device="cuda", dtype=dtype)
    return Engine(model, tokenizer(), max_batch=4, max_seq_len=128, cuda_graph=cuda_graph)


@pytest.mark.parametrize("arch", ["llama", "bitnet"])
def test_graph_replay_equals_the_eager_step(arch: str) -> None:
    engine = _engine(arch, torch.float32)
    prompts = synthetic_tokens(3, 12, seed=2).cuda()
    pad = torch.tensor([0, 4, 7], device="cuda")
    with torch.inference_mode():
        slots = engine.decoder.slots[:12]
        engine.decoder.forward(prompts, slots, pad, engine.cache, 12)
        graphed = CudaGraphDecodeStep(engine.decoder, engine.cache)
        eager = EagerDecodeStep(engine.decoder, engine.cache)
        token = prompts[:, -1]
        for step in range(6):
            want = eager(token, 12 + step, pad).clone()
            got = graphed(token, 12 + step, pad).clone()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            assert eager.last_argmax is None and torch.equal(graphed.last_argmax, got.argmax(-1))
            token = want.argmax(-1)
    assert list(graphed.graphs) == [3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "bitnet"])
def test_graphed_prefill_equals_the_eager_one(arch: str, dtype: torch.dtype) -> None:
    """One graph per (batch, bucket), replayed for new prompts with new padding: the eager forward's logits and
    cache, bit for bit (the same kernels at the same shapes)."""
    engine = _engine(arch, dtype)
    graphed = CudaGraphPrefill(engine.decoder, engine.cache)
    eager = EagerPrefill(engine.decoder, engine.cache)
    assert graphed.length(11, 24) == 16 and graphed.length(100, 24) == 100  # 100 + 24 fits no bucket of 128
    with torch.inference_mode():
        for seed, pads in ((1, [0, 5, 9]), (2, [3, 0, 12]), (3, [0, 0, 0])):
            ids = synthetic_tokens(3, 16, seed=seed).cuda()
            pad = torch.tensor(pads, device="cuda")
            want = eager(ids, pad).clone()
            keys = engine.cache.keys[-1][:3, :, :16].clone()
            engine.cache.keys[-1].zero_()  # the replay must write them again
            got = graphed(ids, pad)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            torch.testing.assert_close(engine.cache.keys[-1][:3, :, :16], keys, rtol=0, atol=0)
        assert list(graphed.graphs) == [(3, 16)]
        graphed(synthetic_tokens(1, 16, seed=4).cuda(), torch.tensor([2], device="cuda"))
        odd, no_pad = synthetic_tokens(1, 17, seed=5).cuda(), torch.tensor([0], device="cuda")
        torch.testing.assert_close(graphed(odd, no_pad), eager(odd, no_pad))  # not a bucket: eager, no graph
    assert sorted(graphed.graphs) == [(1, 16), (3, 16)]


@pytest.mark.parametrize("arch", ["llama", "bitnet"])
def test_generation_with_and_without_graphs_agrees(arch: str) -> None:
    prompts = [synthetic_tokens(1, n, seed=n)[0].tolist() for n in (5, 17, 9)]
    graphed = _engine(arch, torch.float32).generate_ids(prompts, 24, ignore_eos=True)
    eager = _engine(arch, torch.float32, cuda_graph=False).generate_ids(prompts, 24, ignore_eos=True)
    assert graphed.token_ids == eager.token_ids
    again = _engine(arch, torch.float32)
    for prompt, ids in zip(prompts, graphed.token_ids, strict=True):  # batch 1: another graph, same tokens
        assert again.generate_ids([prompt], 24, ignore_eos=True).token_ids[0] == ids
    # with a repetition penalty the graph's own argmax must not be taken (a prompt whose continuation the penalty
    # changes: the models' language rarely repeats a token within 24)
    prompt = [synthetic_tokens(1, 12, seed=11)[0].tolist()]
    plain = again.generate_ids(prompt, 24, ignore_eos=True).token_ids
    penalized = again.generate_ids(prompt, 24, repetition_penalty=3.0, ignore_eos=True).token_ids
    eager_engine = _engine(arch, torch.float32, cuda_graph=False)
    assert penalized != plain
    assert penalized == eager_engine.generate_ids(prompt, 24, repetition_penalty=3.0, ignore_eos=True).token_ids


@pytest.mark.parametrize("arch", ["llama", "bitnet"])
def test_bf16_engine_on_gpu_meets_the_thresholds(arch: str) -> None:
    reference = trained_model(arch)
    ids = synthetic_tokens(8, 96, seed=7)
    with torch.no_grad():
        ref = reference(ids).logits.float()
    out = _engine(arch, torch.bfloat16).logits(ids).float().cpu()
    assert float((out - ref).norm() / ref.norm()) <= 2e-2
    assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.98
    out32 = _engine(arch, torch.float32).logits(ids).float().cpu()
    assert float((out32 - ref).norm() / ref.norm()) <= 1e-3
    assert float((out32.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.995


def test_sampling_on_gpu_is_seeded() -> None:
    engine = _engine("bitnet", torch.bfloat16)
    prompts = [synthetic_tokens(1, 8, seed=1)[0].tolist()] * 2
    first = engine.generate_ids(prompts, 16, temperature=3.0, top_p=0.9, seed=0, ignore_eos=True)
    second = engine.generate_ids(prompts, 16, temperature=3.0, top_p=0.9, seed=0, ignore_eos=True)
    assert first.token_ids == second.token_ids
    assert first.decode_tokens_per_second > 0


def test_rows_in_one_pass_compiles_wide_norms_as_one_pass_reductions() -> None:
    """The decode step's norms over 2B4T-wide rows: looped reductions by default, persistent inside the block."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    def norm(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)

    x = torch.randn(1, 6912, device="cuda", dtype=torch.bfloat16)
    codes = []
    for block in (contextlib.nullcontext(), rows_in_one_pass()):
        torch._dynamo.reset()
        with inductor_config.patch(fx_graph_cache=False), block:
            out, (code,) = run_and_get_code(torch.compile(norm), x)
        torch.testing.assert_close(out, norm(x))
        codes.append(code)
    assert "triton_red_" in codes[0] and "triton_per_" not in codes[0]
    assert "triton_per_" in codes[1] and "triton_red_" not in codes[1]


def test_compiled_decode_step_writes_only_the_new_slots_of_the_cache() -> None:
    """Compiled, the step's cache write must update the slot in place, not rebuild the rows' whole cache in a new
    buffer and copy it back (what a write through a ``[:B]`` view of the cache compiles to)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    engine = _engine("llama", torch.float32)
    decoder, cache = engine.decoder, engine.cache
    _, heads, slots, dim = cache.keys[0].shape
    torch._dynamo.reset()
    with torch.inference_mode(), inductor_config.patch(fx_graph_cache=False):
        args = (torch.tensor([[5]], device="cuda"), decoder.slots[3:4], torch.tensor([0], device="cuda"), cache, slots)
        logits, codes = run_and_get_code(torch.compile(decoder.forward), *args)
        eager = decoder.forward(*args)
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-4)
    code = "\n".join(codes)
    assert "empty_strided_cuda((" in code
    # no new buffer of the rows' (or the batch's) whole cache: the write is in place
    assert not re.search(rf"empty_strided_cuda\(\(\d+, {heads}, {slots}, {dim}\)", code)
