"""Does llama.cpp compute the model bittern exported? Perplexity and greedy generations, side by side.

Three small models are trained with ``bittern train`` (continued as ternary from a random ternary start, on
Python's ``help()`` topics 0-59, byte-level BPE tokenizer): a Llama-style model, a BitNet-style model with SiLU
(sub-norms; what llama.cpp's ``bitnet`` graph computes) and a BitNet-style model with relu² (like 2B4T). Each is
exported with ``bittern export gguf`` (TQ2_0 and TQ1_0; the relu² one with ``--allow-activation-mismatch``) and
compared on held-out text the models never saw (topics 60-78):

* perplexity: ``bittern eval`` (:func:`bittern.eval.evaluate_file`) against llama.cpp's teacher-forced perplexity
  over the same token ids and the same windows (:func:`bittern.export.llama_cpp.perplexity`);
* greedy generation: ``--prompts`` prompts, ``--new-tokens`` tokens each, bittern (transformers ``generate``) against
  llama.cpp (argmax decoding): the number of prompts whose continuations agree entirely, and the mean agreeing prefix.

    python benchmarks/gguf_parity.py [--steps 200] [--hidden 256 --intermediate 768 --layers 4] [--json out.json]
    python benchmarks/gguf_parity.py --tiny   # a quick dry run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import torch

PROMPTS = (
    "The import statement",
    "A class definition defines",
    "Exceptions are raised",
    "The for statement is used",
    "Identifiers (also referred to as names)",
)
MODELS = {
    "llama": {"arch": "llama", "hidden_act": "silu"},
    "bitnet-silu": {"arch": "bitnet", "hidden_act": "silu"},
    "bitnet-relu2": {"arch": "bitnet", "hidden_act": "relu2"},
}


def initial_checkpoint(directory: Path, arch: str, hidden_act: str, tokenizer, args: argparse.Namespace) -> Path:
    """A random ternary model (packed) with ``tokenizer``: the start of a continued ternary training run."""
    from transformers import AutoModelForCausalLM, BitNetConfig, LlamaConfig

    import bittern

    values = dict(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = BitNetConfig(hidden_act=hidden_act, **values) if arch == "bitnet" else LlamaConfig(**values)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    bittern.to_ternary(model)
    bittern.save_model(model, directory, "packed", overwrite=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def greedy_agreement(packed: Path, gguf_path: Path, tokenizer, args: argparse.Namespace) -> tuple[int, float]:
    import bittern
    from bittern.eval.perplexity import tokenize
    from bittern.export import llama_cpp as runner

    model = bittern.load_model(packed)
    full, prefixes = 0, []
    for prompt in PROMPTS[: args.prompts]:
        ids = tokenize(tokenizer, prompt)
        with torch.no_grad():
            ours = model.generate(
                ids[None], max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
            )[0, ids.numel() :].tolist()
        theirs = runner.greedy(gguf_path, ids.tolist(), args.new_tokens)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours))
        prefixes.append(same)
        full += same == len(ours)
    return full, sum(prefixes) / len(prefixes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--window", type=int, default=256, help="perplexity window (stride = window / 2)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="bench-gguf-parity")
    parser.add_argument("--tiny", action="store_true", help="dry run: 20 steps, 2 layers")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.layers, args.intermediate, args.vocab_size, args.window = 20, 2, 512, 512, 128
        args.prompts, args.new_tokens, args.work = 2, 16, f"{args.work}-tiny"

    from bittern.eval import evaluate_file, load_tokenizer, read_text, tokenize
    from bittern.export import export_gguf
    from bittern.export import llama_cpp as runner
    from bittern.train import TrainConfig, train
    from bittern.train.corpus import pydoc_topics
    from bittern.train.tokenizer import train_bpe_tokenizer

    work = Path(args.work)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    topics = pydoc_topics()
    for index, text in enumerate(topics[:60]):
        (data / f"{index:02d}.txt").write_text(text, encoding="utf-8")
    held_out = work / "held-out.txt"
    held_out.write_text("\n\n".join(topics[60:]), encoding="utf-8")
    tokenizer = train_bpe_tokenizer(topics[:60], args.vocab_size)

    rows = []
    for name in args.models.split(","):
        spec = MODELS[name]
        run = work / f"run-{name}"
        start = initial_checkpoint(work / f"init-{name}", spec["arch"], spec["hidden_act"], tokenizer, args)
        result = train(
            TrainConfig(
                out=str(run),
                model=str(start),
                data=[str(data)],
                steps=args.steps,
                seq_len=args.seq_len,
                batch_size=8,
                lr=3e-3,
                eval_tokens=4096,
                log_every=max(args.steps // 10, 1),
                seed=args.seed,
                progress=False,
            )
        )
        packed = Path(next(v.path for v in result.variants if v.variant == "packed"))
        stride = args.window // 2
        ours = evaluate_file(packed, held_out, window=args.window, stride=stride, device="cpu", progress=False)
        ids = tokenize(load_tokenizer(packed), read_text(held_out)).tolist()
        for type_name in ("tq2_0", "tq1_0"):
            gguf_path = work / f"{name}-{type_name}.gguf"
            export = export_gguf(
                packed, gguf_path, type_name, overwrite=True, allow_activation_mismatch=spec["hidden_act"] == "relu2"
            )
            theirs = runner.perplexity(gguf_path, ids, args.window, stride)
            agree, prefix = greedy_agreement(packed, gguf_path, tokenizer, args)
            rows.append(
                {
                    "model": name,
                    "type": type_name,
                    "file_kib": round(export.size_bytes / 1024, 1),
                    "tokens": ours.tokens,
                    "bittern_ppl": ours.perplexity,
                    "llama_cpp_ppl": theirs.perplexity,
                    "gap_percent": 100 * (math.exp(theirs.mean_nll - ours.mean_nll) - 1),
                    "greedy_prompts_agreeing": agree,
                    "greedy_mean_prefix": prefix,
                    "train_loss": result.final_loss,
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    print(
        f"\n{args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab_size}, "
        f"{args.steps} steps; held-out window {args.window}, stride {args.window // 2}; "
        f"greedy: {args.prompts} prompts x {args.new_tokens} tokens"
    )
    print("| model | type | bittern ppl | llama.cpp ppl | gap | greedy prompts agreeing | mean agreeing prefix |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['type']} | {r['bittern_ppl']:.3f} | {r['llama_cpp_ppl']:.3f} | "
            f"{r['gap_percent']:+.3f}% | {r['greedy_prompts_agreeing']}/{args.prompts} | "
            f"{r['greedy_mean_prefix']:.1f}/{args.new_tokens} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": platform.platform(), "args": vars(args), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
