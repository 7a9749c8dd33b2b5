"""Training throughput and loss agreement: one GPU against DDP and FSDP2 on all GPUs, same global batch.

Runs ``bittern train`` three times (1 GPU with gradient accumulation; ``torchrun`` DDP; ``torchrun --fsdp``) on
the ``2b4t-shape`` preset (BitNet b1.58 2B4T dimensions; ``--num-layers`` to shorten it) and prints, per
engine, the steady-state tokens/s (between the first and last logged step after ``--skip`` steps), the scaling
against one GPU, and the largest loss difference against the 1-GPU run.

    python benchmarks/distributed_train.py --data DIR [--num-layers 6] [--steps 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def run(engine: str, gpus: int, args: argparse.Namespace, out: Path) -> dict:
    per_device = args.global_batch // gpus if engine != "1gpu" else args.micro_batch
    accum = args.global_batch // (per_device * (gpus if engine != "1gpu" else 1))
    command = [
        "train",
        "--out",
        str(out / engine),
        "--preset",
        "2b4t-shape",
        "--num-layers",
        str(args.num_layers),
        "--data",
        args.data,
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(per_device),
        "--grad-accum",
        str(accum),
        "--steps",
        str(args.steps),
        "--log-every",
        "10",
        "--save-every",
        "100000",
        "--eval-every",
        "100000",
        "--lr",
        "1.5e-3",
        "--no-export",
        "--quiet",
        "--vocab-size",
        "8192",
    ]
    if args.tokenizer:
        command += ["--tokenizer", args.tokenizer]
    if engine == "1gpu":
        launcher = [sys.executable, "-m", "bittern.cli"]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus), "-m", "bittern.cli"]
        env = dict(os.environ)
        if engine == "fsdp2":
            command.append("--fsdp")
    result = subprocess.run(launcher + command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return {"engine": engine, "error": result.stderr[-2000:]}
    records = [json.loads(line) for line in (out / engine / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in records if "loss" in r and r["step"] >= args.skip]
    first, last = logs[0], logs[-1]
    tokens_per_s = (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
    return {
        "engine": engine,
        "gpus": 1 if engine == "1gpu" else gpus,
        "per_device_batch": per_device,
        "grad_accum": accum,
        "tokens_per_s": tokens_per_s,
        "losses": {r["step"]: r["loss"] for r in records if "loss" in r},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer")
    parser.add_argument("--out", default="runs/distributed")
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--skip", type=int, default=20, help="steps left out of the throughput (warm-up)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=4, help="1-GPU micro-batch (accumulated)")
    parser.add_argument("--engines", default="1gpu,ddp,fsdp2")
    parser.add_argument("--json")
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    out = Path(args.out)
    results = []
    for engine in args.engines.split(","):
        results.append(run(engine, gpus, args, out))
        summary = {k: v for k, v in results[-1].items() if k != "losses"}
        print(json.dumps(summary)[:600], flush=True)
        if engine == "1gpu" and not args.tokenizer and (out / engine / "tokenizer").is_dir():
            args.tokenizer = str(out / engine / "tokenizer")  # the others train on exactly the same tokens
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    base = next((r for r in results if r["engine"] == "1gpu" and "error" not in r), None)
    print(
        f"\n2b4t-shape, {args.num_layers} layers, seq {args.seq_len}, global batch {args.global_batch}, "
        f"{args.steps} steps, {torch.cuda.get_device_name(0)} x{gpus}"
    )
    print("| engine | GPUs | batch/device x accum | tokens/s | scaling vs 1 GPU | max |Δloss| vs 1 GPU |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['engine']} | failed: {r['error'].splitlines()[-1] if r['error'] else '?'} |")
            continue
        scaling = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        diff = max(abs(r["losses"][s] - base["losses"][s]) for s in base["losses"]) if base else float("nan")
        print(
            f"| {r['engine']} | {r['gpus']} | {r['per_device_batch']} x {r['grad_accum']} | "
            f"{r['tokens_per_s']:,.0f} | {scaling:.2f}x | {diff:.2e} |"
        )


if __name__ == "__main__":
    main()
