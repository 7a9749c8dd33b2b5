"""CPU inference speed and memory of one ternary model: prompt and generation tokens/s and peak RSS of bittern's engine
(the native CPU kernels) beside llama.cpp (TQ2_0, TQ1_0, F16; Q4_0 optional) and stock transformers' BitLinear, on
the same weights, with 1 and 2 threads.

Models (random ternary weights: every row computes the same shapes whatever the values), relu² BitNet with tied
16-bit embeddings, written once as bittern's packed checkpoint with a byte-level BPE tokenizer trained on Python's
docs:

* ``--shape 302m``: hidden 1536, intermediate 4096, 12 layers, 12 / 4 heads, vocab 8192 (302M ternary weights);
* ``--shape 2b4t``: the microsoft/bitnet-b1.58-2B-4T shape: hidden 2560, intermediate 6912, 30 layers, 20 / 5 heads,
  vocab 128256 (the weights are generated layer by layer, packed, never as a float matrix);
* ``--tiny``: a seconds-long dry run (hidden 256, 2 layers).

Rows (each runs in a process of its own, so that its peak RSS — ``ru_maxrss`` — is its own, loading included):

* ``bittern`` / ``bittern-f32``: ``bittern.load(packed, dtype=bfloat16 / float32)`` and ``Engine.generate_ids``
  (int8 activations x ternary codes on :mod:`bittern.kernels.cpu`; a static KV cache sized to the run);
* ``llama.cpp-tq2_0`` / ``-tq1_0`` / ``-f16``: ``bittern export gguf --type ...`` (embeddings F16) run through
  llama-cpp-python (``pip install 'bittern[llama]'``). llama.cpp's ``bitnet`` graph computes SiLU where the model
  has relu² (written with ``allow_activation_mismatch``): the same weights and shapes, so the same work, though not
  the same numbers; ``llama.cpp-q4_0``: the F16 file quantized by llama.cpp (a speed reference only);
* ``transformers-bitlinear``: stock ``AutoModelForCausalLM.from_pretrained`` of the packed checkpoint (float32, its
  own KV cache; slow: minutes for the 2B4T shape).

Each row processes one ``--prompt-tokens`` prompt (prompt tokens/s: the prompt's forward pass and first token), then
generates ``--new-tokens`` tokens greedily one at a time (generation tokens/s); the best of ``--repeats`` runs is
reported (least disturbed by other processes).

    python benchmarks/cpu.py [--shape 302m|2b4t] [--threads 1,2] [--rows bittern,llama.cpp-tq2_0,...] [--json out]
    python benchmarks/cpu.py --tiny
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

SHAPES = {
    "302m": dict(hidden=1536, intermediate=4096, layers=12, heads=12, kv_heads=4, vocab=8192),
    "2b4t": dict(hidden=2560, intermediate=6912, layers=30, heads=20, kv_heads=5, vocab=128256),
    "tiny": dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=512),
}
GGUF_TYPES = {"llama.cpp-tq2_0": "tq2_0", "llama.cpp-tq1_0": "tq1_0", "llama.cpp-f16": "f16", "llama.cpp-q4_0": "q4_0"}
BITS = {"llama.cpp-tq2_0": 2.0625, "llama.cpp-tq1_0": 1.6875, "llama.cpp-q4_0": 4.5, "llama.cpp-f16": 16.0}
DEFAULT_ROWS = [
    "bittern",
    "bittern-f32",
    "llama.cpp-tq2_0",
    "llama.cpp-tq1_0",
    "llama.cpp-f16",
    "transformers-bitlinear",
]


# --- the model ------------------------------------------------------------------------------------------------------


def _random_packed(rows: int, k: int, generator):  # -> torch.Tensor (torch is imported only where needed)
    """uint8 ``[rows, k]`` of random valid 2-bit codes (each field 0, 1 or 2: code -1, 0 or 1)."""
    import torch

    valid = torch.tensor([a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3) for c in range(3)
                          for d in range(3)], dtype=torch.uint8)  # fmt: skip
    return valid[torch.randint(0, len(valid), (rows, k), generator=generator)]


def build_model(shape: dict[str, int], out: Path) -> None:
    """Write a random relu² BitNet as bittern's packed checkpoint (ternary layers made packed, embeddings bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, BitNetConfig

    import bittern
    from bittern.nn import TernaryLinear
    from bittern.train.corpus import pydoc_topics
    from bittern.train.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(pydoc_topics()[:40], min(shape["vocab"], 4096))
    config = BitNetConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=4096,
        hidden_act="relu2",
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            n, k = module.out_features, module.in_features
            packed = _random_packed(-(-n // 4), k, generator)
            scale = (torch.rand(1, generator=generator) + 0.5) * 40
            model.model.layers.set_submodule(name, TernaryLinear.from_packed(packed, n, scale))
    hidden, vocab = shape["hidden"], shape["vocab"]
    embeddings = torch.empty(vocab, hidden, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)
    model.model.embed_tokens.weight = torch.nn.Parameter(embeddings)
    for module in model.modules():
        if type(module).__name__ == "BitNetRMSNorm":
            module.weight = torch.nn.Parameter(torch.ones(module.weight.shape, dtype=torch.bfloat16))
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its tables computed here, not on meta
    model.tie_weights()
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    bittern.save_model(model, out, "packed")
    tokenizer.save_pretrained(str(out))


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Path], list[int]]:
    """The packed checkpoint, the GGUF files the rows need (reused when ``work`` holds them) and the prompt ids."""
    from transformers import AutoTokenizer

    from bittern.export import export_gguf
    from bittern.train.corpus import pydoc_topics

    packed = work / "packed"
    if not packed.exists():
        print(f"building the {args.shape} model in {packed} ...", flush=True)
        build_model(SHAPES[args.shape], packed)
    files = {}
    for row in args.rows:
        kind = GGUF_TYPES.get(row)
        if kind is None:
            continue
        files[row] = work / f"model-{kind}.gguf"
        if files[row].exists():
            continue
        if kind == "q4_0":
            f16 = work / "model-f16.gguf"
            if not f16.exists():
                export_gguf(packed, f16, "f16", embeddings="f16", allow_activation_mismatch=True)
            import llama_cpp

            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
            if llama_cpp.llama_model_quantize(str(f16).encode(), str(files[row]).encode(), llama_cpp.byref(params)):
                raise RuntimeError("llama_model_quantize failed")
        else:
            print(f"exporting {files[row].name} ...", flush=True)
            export_gguf(packed, files[row], kind, embeddings="f16", allow_activation_mismatch=True)
    tokenizer = AutoTokenizer.from_pretrained(str(packed))
    prompt = tokenizer("\n\n".join(pydoc_topics()[40:]), add_special_tokens=False)["input_ids"][: args.prompt_tokens]
    return packed, files, prompt


# --- the rows (each in its own process) ------------------------------------------------------------------------------


def run_bittern(dtype: str, isa: str | None = None) -> Callable[[dict], tuple[float, float]]:
    def run(job: dict) -> tuple[float, float]:
        import torch

        import bittern
        from bittern.kernels import cpu

        torch.set_num_threads(job["threads"])
        if isa is not None:
            cpu.set_isa(isa)

        prompt, new = job["prompt"], job["new_tokens"]
        engine = bittern.load(job["packed"], device="cpu", dtype=dtype, max_batch=1, max_seq_len=len(prompt) + new + 8)
        engine.generate_ids([prompt[:8]], 4, ignore_eos=True)  # warm-up
        best = (float("inf"), float("inf"))
        for _ in range(job["repeats"]):
            result = engine.generate_ids([prompt], new + 1, ignore_eos=True)  # the first token comes with the prompt
            best = (min(best[0], result.prefill_seconds), min(best[1], result.decode_seconds))
        return best

    return run


def run_llama_cpp(job: dict) -> tuple[float, float]:
    from bittern.export import llama_cpp as runner

    prompt, new = job["prompt"], job["new_tokens"]
    best = (float("inf"), float("inf"))
    with runner.open_model(job["gguf"], n_ctx=len(prompt) + new + 8, threads=job["threads"], logits_all=False) as model:
        model.eval(prompt[:8])  # warm-up: allocate the compute buffers
        for _ in range(job["repeats"]):
            model.reset()
            start = time.perf_counter()
            model.eval(prompt)
            token = int(runner.last_logits(model).argmax())
            prompt_seconds = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(new):
                model.eval([token])
                token = int(runner.last_logits(model).argmax())
            best = (min(best[0], prompt_seconds), min(best[1], time.perf_counter() - start))
    return best


def run_transformers(job: dict) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["packed"], dtype=torch.float32).eval()
    ids = torch.tensor([job["prompt"]])
    best = (float("inf"), float("inf"))
    with torch.inference_mode():
        model(ids[:, :8], use_cache=True)  # warm-up
        for _ in range(job["repeats"]):
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            prompt_seconds = time.perf_counter() - start
            cache = out.past_key_values
            start = time.perf_counter()
            for _ in range(job["new_tokens"]):
                out = model(token, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            best = (min(best[0], prompt_seconds), min(best[1], time.perf_counter() - start))
    return best


ROWS: dict[str, Callable[[dict], tuple[float, float]]] = {
    "bittern": run_bittern("bfloat16"),
    "bittern-f32": run_bittern("float32"),
    "bittern-avx2": run_bittern("bfloat16", isa="avx2"),  # the kernels' AVX2 level, whatever the CPU has
    **{row: run_llama_cpp for row in GGUF_TYPES},
    "transformers-bitlinear": run_transformers,
}


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM: its own memory only — ``ru_maxrss`` would carry over the parent's
    peak through fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: kilobytes (bytes on macOS)


def child(job: dict) -> None:
    """Run one row (in this process; llama.cpp's rows without importing torch) and print its result as one JSON
    line."""
    prompt_seconds, generate_seconds = ROWS[job["row"]](job)
    peak = _peak_rss_mib()
    print(json.dumps({"prompt_seconds": prompt_seconds, "generate_seconds": generate_seconds, "peak_rss_mib": peak}))


def _torch_version() -> str:
    import torch

    return torch.__version__


# --- the driver -------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], default="302m")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", default="1,2", help="comma list of thread counts")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the best is reported")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma list out of {','.join(ROWS)}")
    parser.add_argument("--work", help="directory for the checkpoint and GGUF files (reused; default bench-cpu-SHAPE)")
    parser.add_argument("--tiny", action="store_true", help="dry run: hidden 256, 2 layers, 32 + 8 tokens")
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.tiny:
        args.shape, args.prompt_tokens, args.new_tokens, args.repeats = "tiny", 32, 8, 1
    args.rows = [row for row in args.rows.split(",") if row]
    unknown = [row for row in args.rows if row not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    threads = [int(t) for t in args.threads.split(",") if t]
    work = Path(args.work or f"bench-cpu-{args.shape}")
    work.mkdir(parents=True, exist_ok=True)
    packed, files, prompt = prepare(args, work)

    results = []
    for row in args.rows:
        for count in threads:
            job = {"row": row, "threads": count, "packed": str(packed), "gguf": str(files.get(row, "")),
                   "prompt": prompt, "new_tokens": args.new_tokens, "repeats": args.repeats}  # fmt: skip
            done = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True
            )
            if done.returncode:
                print(f"{row} ({count} threads) failed:\n{done.stderr[-2000:]}", flush=True)
                continue
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            size = files[row].stat().st_size if row in files else None
            results.append(
                {
                    "row": row,
                    "threads": count,
                    "bits_per_linear_weight": BITS.get(row, 2.0),
                    "file_mib": round(size / 2**20, 1) if size else None,
                    "prompt_tokens_per_s": len(prompt) / measured["prompt_seconds"],
                    "generate_tokens_per_s": args.new_tokens / measured["generate_seconds"],
                    "peak_rss_mib": round(measured["peak_rss_mib"]),
                }
            )
            r = results[-1]
            print(f"{row} ({count} threads): prompt {r['prompt_tokens_per_s']:.1f} tok/s, generate "
                  f"{r['generate_tokens_per_s']:.2f} tok/s, peak RSS {r['peak_rss_mib']} MiB", flush=True)  # fmt: skip
    shape = SHAPES[args.shape]
    print(f"\nmodel: relu² BitNet {args.shape} (hidden {shape['hidden']}, intermediate {shape['intermediate']}, "
          f"{shape['layers']} layers, {shape['heads']}/{shape['kv_heads']} heads, vocab {shape['vocab']}); prompt "
          f"{len(prompt)} tokens, {args.new_tokens} generated; best of {args.repeats}")  # fmt: skip
    print(
        "| row | threads | bits/weight | file MiB | prompt tok/s | generate tok/s | peak RSS MiB | vs llama.cpp TQ2_0 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        base = next((b for b in results if b["row"] == "llama.cpp-tq2_0" and b["threads"] == r["threads"]), None)
        ratio = "-"
        if base:
            ratio = (f"prompt {r['prompt_tokens_per_s'] / base['prompt_tokens_per_s']:.2f}x, generate "
                     f"{r['generate_tokens_per_s'] / base['generate_tokens_per_s']:.2f}x, RSS "
                     f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x")  # fmt: skip
        speed = f"{r['prompt_tokens_per_s']:.1f}", f"{r['generate_tokens_per_s']:.2f}"
        cells = [
            r["row"],
            r["threads"],
            r["bits_per_linear_weight"],
            r["file_mib"] or "-",
            *speed,
            r["peak_rss_mib"],
            ratio,
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.json:
        payload = {
            "machine": platform.platform(),
            "processor": platform.processor(),
            "torch": _torch_version(),
            "args": {k: v for k, v in vars(args).items() if k != "child"},
            "results": results,
        }
        Path(args.json).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
