"""Step time of converting a SmolLM2-135M-shaped model: student BitLinear (λ < 1 and λ = 1) + frozen teacher,
bf16 autocast, AdamW — to size the SmolLM2 recipe's step count for a time budget.

    python benchmarks/conversion_step.py [--batch-size 16] [--seq-len 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import bittern
from bittern.train.trainer import distillation_kl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    teacher = LlamaForCausalLM(config).cuda().eval().requires_grad_(False)
    student = bittern.to_bitlinear(copy.deepcopy(teacher).train().requires_grad_(True))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device="cuda")
    rows = {}
    for lam in (0.5, 1.0):
        for module in student.modules():
            if isinstance(module, bittern.BitLinear):
                module.lam = lam
        times = []
        for step in range(args.steps + 3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = student(input_ids=ids, labels=ids)
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=ids).logits
                loss = out.loss + distillation_kl(out.logits, teacher_logits, ids, 1.0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= 3:
                times.append(time.perf_counter() - start)
        median = statistics.median(times)
        rows[f"lambda={lam}"] = {"ms": median * 1e3, "tokens_per_s": args.batch_size * args.seq_len / median}
    rows["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
