"""``bittern demo``: the end-to-end path on an embedded default, downloading nothing.

Until training lands, the demo builds a small random Llama, converts it to ternary, exports every variant,
reloads each one (with bittern, and with stock transformers where that is the point of the format), and
prints variant / size / bits per linear weight / max logit difference against the in-memory float32
ternary model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bittern.checkpoint import load_model, save_model
from bittern.convert import set_activation_quantization, to_bitlinear, to_ternary
from bittern.inspection import inspect_checkpoint


@dataclass
class DemoRow:
    """One line of the demo table."""

    variant: str
    loader: str
    size_bytes: int
    bits_per_weight: float
    relative_error: float
    max_logit_diff: float
    argmax_agreement: float
    compared_with: str


def build_demo_model(seed: int = 0):
    """A random Llama (hidden 256, 4 layers, 8 heads / 4 KV heads, vocab 2048), float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _stock_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    with torch.no_grad():
        return model(ids).logits.float()


def run_demo(out_dir: str | Path = "bittern-demo", seed: int = 0, stock: bool = True) -> list[DemoRow]:
    """Run the demo, writing the variants under ``out_dir`` (replacing the demo's own earlier outputs)."""
    out = Path(out_dir)
    model = build_demo_model(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(seed + 1))
    to_bitlinear(model)
    with torch.no_grad():
        ref_no_act = set_activation_quantization(model, False)(ids).logits
        set_activation_quantization(model, True)
        prequantized_dir = save_model(model, out / "prequantized", "prequantized", overwrite=True)
        to_ternary(model)
        ref = model(ids).logits

        exports = {
            "packed (divide)": save_model(model, out / "packed", "packed", overwrite=True),
            "packed (multiply)": save_model(
                model, out / "packed-multiply", "packed", scale_convention="multiply", overwrite=True
            ),
            "bf16": save_model(model, out / "bf16", "bf16", overwrite=True),
            "prequantized": prequantized_dir,
        }
        rows = []
        for variant, directory in exports.items():
            report = inspect_checkpoint(directory)
            loaders = [("bittern", lambda d=directory: load_model(d)(ids).logits)]
            if stock and variant != "prequantized":
                loaders.append(("transformers", lambda d=directory: _stock_logits(d, ids)))
            for loader, run in loaders:
                # stock transformers runs the bf16 variant as a plain model: no activation quantization
                plain = variant == "bf16" and loader == "transformers"
                reference, against = (ref_no_act, "ternary, no act. quant") if plain else (ref, "ternary")
                logits = run()
                rows.append(
                    DemoRow(
                        variant,
                        loader,
                        report.file_bytes,
                        report.bits_per_linear_weight,
                        ((logits - reference).norm() / reference.norm()).item(),
                        (logits - reference).abs().max().item(),
                        (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
                        against,
                    )
                )
    return rows


def format_table(rows: list[DemoRow]) -> str:
    """The demo table as aligned text."""
    header = ("variant", "loaded by", "size", "bits/linear weight", "‖Δ‖/‖ref‖", "max |Δlogit|", "argmax =", "ref")
    body = [
        (
            r.variant,
            r.loader,
            f"{r.size_bytes / 2**20:.2f} MiB",
            f"{r.bits_per_weight:.3f}",
            f"{r.relative_error:.1e}",
            f"{r.max_logit_diff:.1e}",
            f"{100 * r.argmax_agreement:.1f}%",
            r.compared_with,
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(out_dir: str | Path = "bittern-demo", seed: int = 0, stock: bool = True) -> int:
    """Entry point of ``bittern demo``: run, print the table, return an exit code."""
    started = time.perf_counter()
    print(f"bittern demo: random Llama (4 layers, hidden 256) → ternary → every variant under {out_dir}/")
    rows = run_demo(out_dir, seed, stock)
    print(format_table(rows))
    print(
        "ref: the in-memory float32 ternary model (TernaryLinear: int8 activations x ternary weights, exact integer "
        "matmul);\n'no act. quant': the same weights with activation quantization off, which is what a plain bf16 "
        "model computes."
    )
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0
