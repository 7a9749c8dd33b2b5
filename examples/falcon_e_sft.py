"""The Falcon-E fine-tuning recipe (the Falcon-Edge blog / onebitllms README), line by line, on bittern.

The published recipe loads the ``prequantized`` revision of a Falcon-E model (latent bf16 weights, a plain
``LlamaForCausalLM`` config with ``"is_bitnet_config": true``), swaps its linear layers with onebitllms'
``replace_linear_with_bitnet_linear``, fine-tunes with TRL's ``SFTTrainer`` and exports with ``quantize_to_1bit``.
Here the same three names come from :mod:`bittern.compat`; every other line is the recipe's own.

    python examples/falcon_e_sft.py --model DIR --out runs/falcon-e-sft [--steps 200] [--data FILE.jsonl]

``--model`` is a local copy of a prequantized revision (model hubs are not needed). Without it, ``--tiny`` builds a
small replica first (the published config keys and layout, random weights, a byte-level tokenizer trained on
Python's own documentation), so the whole recipe runs in a minute on a CPU; CI runs it that way. The packed result
loads in stock transformers (``AutoModelForCausalLM.from_pretrained``) and in bittern (``bittern generate``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from bittern.compat import quantize_to_1bit, replace_linear_with_bitnet_linear
from bittern.train.corpus import default_corpus
from bittern.train.tokenizer import train_bpe_tokenizer


def build_tiny_prequantized(directory: Path) -> Path:
    """A small Falcon-E ``prequantized`` replica in ``directory``: Llama layout, ``is_bitnet_config``, bf16 weights,
    no ``quantization_config``, and a tokenizer."""
    documents = default_corpus(docstrings=False)
    tokenizer = train_bpe_tokenizer(documents, vocab_size=512)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.is_bitnet_config = True  # how the Falcon-E family marks its latent (prequantized) checkpoints
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def training_texts(data: Path | None, limit: int) -> Dataset:
    """The fine-tuning set: ``"text"`` records of a JSONL file, or Python's ``help()`` topics."""
    if data is None:
        texts = default_corpus(docstrings=False)
    else:
        texts = [json.loads(line)["text"] for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    return Dataset.from_dict({"text": texts[:limit]})


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a local prequantized (latent) Falcon-E checkpoint directory")
    parser.add_argument("--tiny", action="store_true", help="build a small replica under --out and use it")
    parser.add_argument("--out", type=Path, required=True, help="run directory (trained latents, packed export)")
    parser.add_argument("--data", type=Path, help='a JSONL file of {"text": ...} records (default: embedded docs)')
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4, as in the recipe)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per training example (default 256)")
    args = parser.parse_args(argv)
    if (args.model is None) == (not args.tiny):
        parser.error("give exactly one of --model DIR and --tiny")
    model_id = str(args.model or build_tiny_prequantized(args.out / "prequantized"))
    model_output_dir = args.out / "sft"
    quantized_model_output_dir = args.out / "packed"

    tokenizer = AutoTokenizer.from_pretrained(model_id)
    model = AutoModelForCausalLM.from_pretrained(
        model_id, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32
    )
    model = replace_linear_with_bitnet_linear(model)

    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(model_output_dir),
            max_steps=args.steps,
            learning_rate=args.lr,
            per_device_train_batch_size=4,
            max_length=args.max_length,
            logging_steps=max(1, args.steps // 10),
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
        ),
        train_dataset=training_texts(args.data, limit=max(64, 4 * args.steps)),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(str(model_output_dir))
    tokenizer.save_pretrained(str(model_output_dir))

    quantize_to_1bit(model_output_dir, quantized_model_output_dir)
    print(f"packed model: {quantized_model_output_dir} (bittern generate {quantized_model_output_dir} --prompt ...)")
    return quantized_model_output_dir


if __name__ == "__main__":
    main()
