"""Peak memory of ``bittern.load_model`` on a 2B4T-shaped packed checkpoint (CPU).

A BitNet b1.58 2B4T-shaped checkpoint (hidden 2560, intermediate 6912, 30 layers, 20 / 5 heads, vocab 128256, tied
bf16 embeddings; every block linear packed, random codes) is written once to ``--dir`` (about 1.2 GB), then loaded
by ``bittern.load_model`` in a fresh Python process per source tree given with ``--tree`` (a directory holding
``src/bittern``; default: this checkout). Each child reports its peak resident set size (``VmHWM``, Linux) after
importing bittern and after the load; the difference is what loading cost. The packed weights are 0.52 GB and the
embeddings 0.66 GB, so a load that keeps only what the model holds peaks near 1.2 GB above the import.

    python benchmarks/load_memory.py --dir /tmp/b2b4t [--layers 30] [--tree OLD_CHECKOUT --tree .] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import bittern

    def peak_mib():  # VmHWM: this process image's own peak (ru_maxrss would carry the parent's over exec)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    before = peak_mib()
    start = time.perf_counter()
    model = bittern.load_model(sys.argv[1])
    seconds = time.perf_counter() - start
    after = peak_mib()
    ternary = sum(type(m).__name__ == "TernaryLinear" for m in model.modules())
    print(json.dumps({"import_mib": before, "peak_mib": after, "seconds": seconds, "ternary": ternary}))
    """
)


def write_checkpoint(directory: Path, layers: int) -> None:
    """The 2B4T-shaped packed checkpoint (bittern's own writer, divide convention, bf16 dense tensors)."""
    import torch
    from transformers import BitNetConfig

    from bittern import packing
    from bittern.formats import Checkpoint, TernaryWeight, write_packed

    config = BitNetConfig(
        vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_hidden_layers=layers,
        num_attention_heads=20, num_key_value_heads=5, hidden_act="relu2", tie_word_embeddings=True,
        max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    shapes = {
        "self_attn.q_proj": (2560, 2560), "self_attn.k_proj": (640, 2560), "self_attn.v_proj": (640, 2560),
        "self_attn.o_proj": (2560, 2560), "mlp.gate_proj": (6912, 2560), "mlp.up_proj": (6912, 2560),
        "mlp.down_proj": (2560, 6912),
    }  # fmt: skip
    ternary: dict[str, TernaryWeight] = {}
    tensors = {"model.embed_tokens.weight": (torch.randn(128256, 2560, generator=generator) * 0.02).bfloat16()}
    tensors["model.norm.weight"] = torch.ones(2560, dtype=torch.bfloat16)
    for block in range(layers):
        prefix = f"model.layers.{block}"
        for name, (n, k) in shapes.items():
            codes = torch.randint(-1, 2, (n, k), generator=generator, dtype=torch.int8)
            packed = packing.pack_ternary_rows(codes)
            ternary[f"{prefix}.{name}"] = TernaryWeight(None, torch.tensor([k**0.5]), packed=packed, out_features=n)
        for norm, width in (("input_layernorm", 2560), ("post_attention_layernorm", 2560),
                            ("self_attn.attn_sub_norm", 2560), ("mlp.ffn_sub_norm", 6912)):  # fmt: skip
            tensors[f"{prefix}.{norm}.weight"] = torch.ones(width, dtype=torch.bfloat16)
    checkpoint = Checkpoint(config=config.to_dict(), tensors=tensors, ternary=ternary, dense_linear_layers=["lm_head"])
    write_packed(checkpoint, directory)


def measure(tree: Path, directory: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory)], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"loading with {tree} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the checkpoint is (written if missing)")
    parser.add_argument("--layers", type=int, default=30, help="decoder blocks (default 30, the 2B4T depth)")
    parser.add_argument("--tree", type=Path, action="append", help="a source checkout to load with (repeatable)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if not (args.dir / "config.json").is_file():
        write_checkpoint(args.dir, args.layers)
    trees = args.tree or [ROOT]
    rows = []
    for tree in trees:
        figures = measure(tree.resolve(), args.dir)
        rows.append({"tree": str(tree), **figures, "load_mib": figures["peak_mib"] - figures["import_mib"]})
    print(f"{'tree':40s} {'import MiB':>10s} {'peak MiB':>9s} {'load MiB':>9s} {'seconds':>8s}")
    for row in rows:
        print(f"{row['tree'][-40:]:40s} {row['import_mib']:10.0f} {row['peak_mib']:9.0f} {row['load_mib']:9.0f} "
              f"{row['seconds']:8.2f}")  # fmt: skip
    if args.json:
        report = {"machine": platform.processor() or platform.machine(), "layers": args.layers, "rows": rows}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
