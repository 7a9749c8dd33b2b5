"""CPU inference speed of one ternary model: prompt and generation tokens/s in llama.cpp (TQ2_0, TQ1_0, Q4_0,
F16), on bittern's own CPU path, and on stock transformers' BitLinear — all with ``--threads`` threads.

Model: a Llama with random ternary weights (default hidden 1536, intermediate 4096, 12 layers, 12 heads / 4 KV
heads, vocab 8192, tied embeddings; every width a multiple of 256, so TQ1_0/TQ2_0 hold every linear layer).
Random weights are enough for speed: every row computes the same shapes whatever the values. It is written once
as bittern's packed checkpoint (with a byte-level BPE tokenizer trained on Python's docs), then:

* ``llama.cpp-tq2_0`` / ``llama.cpp-tq1_0`` / ``llama.cpp-f16``: ``bittern export gguf --type ...`` (embeddings
  F16), run through llama-cpp-python;
* ``llama.cpp-q4_0``: the F16 file quantized by llama.cpp's own ``llama_model_quantize`` (Q4_0 is not exact for
  ternary weights: a speed reference only);
* ``bittern``: ``bittern.load_model`` (TernaryLinear: int8 activations x ternary codes, exact integer matmul) run
  with Hugging Face's KV cache;
* ``transformers-bitlinear``: stock ``AutoModelForCausalLM.from_pretrained`` of the packed checkpoint
  (transformers' BitLinear), same loop.

Each row processes one ``--prompt-tokens`` prompt (prompt tokens/s = prompt / time of that forward pass), then
generates ``--new-tokens`` tokens greedily one at a time (generation tokens/s); the best of ``--repeats`` runs is
reported (least disturbed by other processes). A row is one function of :data:`ROWS` (``name -> fn(setup, args)``
returning ``(prompt_seconds, generate_seconds)``): add a runtime by adding a function.

    python benchmarks/cpu.py [--hidden 1536 --intermediate 4096 --layers 12] [--threads 2] [--rows ...]
        [--json out.json]
    python benchmarks/cpu.py --tiny     # a seconds-long dry run (hidden 256, 2 layers)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Setup:
    """What every row gets: the packed checkpoint, the GGUF files, and the token ids to run."""

    packed: Path
    gguf: dict[str, Path]
    prompt: list[int]
    new_tokens: int
    threads: int


def _llama_cpp(kind: str) -> Callable[[Setup, argparse.Namespace], tuple[float, float]]:
    def run(setup: Setup, args: argparse.Namespace) -> tuple[float, float]:
        from bittern.export import llama_cpp as runner

        n_ctx = len(setup.prompt) + setup.new_tokens + 8
        with runner.open_model(setup.gguf[kind], n_ctx=n_ctx, threads=setup.threads, logits_all=False) as model:
            model.eval(setup.prompt[:8])  # warm-up: allocate the compute buffers
            model.reset()
            start = time.perf_counter()
            model.eval(setup.prompt)
            prompt_seconds = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(setup.new_tokens):
                model.eval([int(runner.last_logits(model).argmax())])
            return prompt_seconds, time.perf_counter() - start

    return run


def _torch_loop(model, setup: Setup) -> tuple[float, float]:
    """Prompt forward pass, then greedy decoding one token at a time with the KV cache."""
    torch.set_num_threads(setup.threads)
    ids = torch.tensor([setup.prompt])
    with torch.inference_mode():
        model(ids[:, :8], use_cache=True)  # warm-up
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prompt_seconds = time.perf_counter() - start
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(setup.new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        return prompt_seconds, time.perf_counter() - start


def run_bittern(setup: Setup, args: argparse.Namespace) -> tuple[float, float]:
    import bittern

    return _torch_loop(bittern.load_model(setup.packed), setup)


def run_transformers_bitlinear(setup: Setup, args: argparse.Namespace) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(setup.packed), dtype=torch.float32).eval()
    return _torch_loop(model, setup)


ROWS: dict[str, Callable[[Setup, argparse.Namespace], tuple[float, float]]] = {
    "llama.cpp-tq2_0": _llama_cpp("tq2_0"),
    "llama.cpp-tq1_0": _llama_cpp("tq1_0"),
    "llama.cpp-q4_0": _llama_cpp("q4_0"),
    "llama.cpp-f16": _llama_cpp("f16"),
    "bittern": run_bittern,
    "transformers-bitlinear": run_transformers_bitlinear,
}
BITS = {"llama.cpp-tq2_0": 2.0625, "llama.cpp-tq1_0": 1.6875, "llama.cpp-q4_0": 4.5, "llama.cpp-f16": 16.0}


def build(args: argparse.Namespace, work: Path) -> Setup:
    """Write the packed checkpoint and the GGUF files (reused when ``work`` already holds them)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import bittern
    from bittern.export import export_gguf
    from bittern.train.corpus import pydoc_topics
    from bittern.train.tokenizer import train_bpe_tokenizer

    texts = pydoc_topics()
    tokenizer = train_bpe_tokenizer(texts[:40], min(args.vocab, 4096))
    packed = work / "packed"
    if not packed.exists():
        config = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        bittern.to_ternary(model)
        bittern.save_model(model, packed, "packed")
        tokenizer.save_pretrained(str(packed))
        del model
    files = {}
    for kind in ("tq2_0", "tq1_0", "f16"):
        files[kind] = work / f"model-{kind}.gguf"
        if not files[kind].exists():
            export_gguf(packed, files[kind], kind, embeddings="f16")
    files["q4_0"] = work / "model-q4_0.gguf"
    if not files["q4_0"].exists() and any(row.endswith("q4_0") for row in args.rows):
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = args.threads
        status = llama_cpp.llama_model_quantize(
            str(files["f16"]).encode(), str(files["q4_0"]).encode(), llama_cpp.byref(params)
        )
        if status != 0:
            raise RuntimeError(f"llama_model_quantize failed with status {status}")
    prompt = tokenizer("\n\n".join(texts[40:]), add_special_tokens=False)["input_ids"][: args.prompt_tokens]
    return Setup(packed, files, prompt, args.new_tokens, args.threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the best is reported")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list out of {','.join(ROWS)}")
    parser.add_argument("--work", default="bench-cpu", help="directory for the checkpoint and GGUF files (reused)")
    parser.add_argument("--tiny", action="store_true", help="dry run: hidden 256, intermediate 512, 2 layers")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.tiny:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 256, 512, 2, 4, 2
        args.vocab, args.prompt_tokens, args.new_tokens, args.repeats = 512, 32, 8, 1
        args.work = f"{args.work}-tiny"
    args.rows = [row for row in args.rows.split(",") if row]
    unknown = [row for row in args.rows if row not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    setup = build(args, work)

    results = []
    for row in args.rows:
        best_prompt, best_gen = float("inf"), float("inf")
        for _ in range(args.repeats):
            prompt_seconds, generate_seconds = ROWS[row](setup, args)
            best_prompt, best_gen = min(best_prompt, prompt_seconds), min(best_gen, generate_seconds)
        kind = row.rsplit("-", 1)[-1]
        size = setup.gguf[kind].stat().st_size if row.startswith("llama.cpp") else None
        results.append(
            {
                "row": row,
                "bits_per_linear_weight": BITS.get(row, 2.0),
                "file_mib": round(size / 2**20, 1) if size else None,
                "prompt_tokens_per_s": len(setup.prompt) / best_prompt,
                "generate_tokens_per_s": setup.new_tokens / best_gen,
            }
        )
        print(
            f"{row}: prompt {results[-1]['prompt_tokens_per_s']:.1f} tok/s, "
            f"generate {results[-1]['generate_tokens_per_s']:.2f} tok/s",
            flush=True,
        )
    base = next((r["generate_tokens_per_s"] for r in results if r["row"] == "llama.cpp-f16"), None)
    print(
        f"\nmodel: Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"vocab {args.vocab}; prompt {len(setup.prompt)} tokens, {args.new_tokens} generated; "
        f"{args.threads} threads; best of {args.repeats}"
    )
    print("| row | bits/weight | file MiB | prompt tok/s | generate tok/s | generate vs llama.cpp F16 |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['generate_tokens_per_s'] / base:.2f}x" if base else "-"
        print(
            f"| {r['row']} | {r['bits_per_linear_weight']} | {r['file_mib'] or '-'} | "
            f"{r['prompt_tokens_per_s']:.1f} | {r['generate_tokens_per_s']:.2f} | {ratio} |"
        )
    if args.json:
        payload = {
            "machine": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "args": {k: v for k, v in vars(args).items()},
            "results": results,
        }
        Path(args.json).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
