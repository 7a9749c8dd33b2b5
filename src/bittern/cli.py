"""The ``bittern`` command line. Every verb is also a Python function:

* ``bittern convert`` → :func:`bittern.checkpoint.convert_checkpoint`
* ``bittern export gguf`` → :func:`bittern.export.export_gguf`
* ``bittern inspect`` → :func:`bittern.inspection.inspect_checkpoint`
* ``bittern eval``    → :func:`bittern.eval.evaluate_file`
* ``bittern train``   → :func:`bittern.train.train`
* ``bittern demo``    → :func:`bittern.demo.run_demo`
* ``bittern generate`` → :meth:`bittern.engine.Engine.generate` (``bittern.load(path).generate(...)``)
* ``bittern chat``    → :func:`bittern.engine.chat.chat_loop`
* ``bittern serve``   → :func:`bittern.serve.serve`
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from bittern import __version__
from bittern.errors import BitternError
from bittern.train.config import CHAT_TEMPLATE_HELP, add_train_options

_DTYPES = ("bfloat16", "float16", "float32")
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return value


def _add_convert(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "convert",
        help="convert a checkpoint into a bittern variant (packed, bf16, prequantized)",
        description=(
            "Read SRC (any supported checkpoint directory: bittern's variants, Falcon-E style or 2B4T style "
            "packed bitnet checkpoints, or a plain full-precision Hugging Face model, which is ternarized) and "
            "write DST as one variant. The output is written to a temporary directory and renamed into place; "
            "an existing DST is never touched without --overwrite."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "variants:\n"
            "  packed        Hugging Face 'bitnet' layout: 2-bit codes + one scale per layer. Stock transformers\n"
            "                loads it with AutoModelForCausalLM.from_pretrained (needs accelerate).\n"
            "  bf16          dense Wt*s weights, a plain checkpoint any tool loads (no activation quantization).\n"
            "  prequantized  latent weights + a marker; bittern reloads it as BitLinear layers for training.\n"
            "\nexamples:\n"
            "  bittern convert ./my-llama ./my-llama-ternary --to packed\n"
            "  bittern convert ./falcon-e ./falcon-e-2b4t-style --to packed --scale-convention multiply\n"
            "  bittern convert ./model-packed ./model-bf16 --to bf16\n"
        ),
    )
    parser.add_argument("src", help="source checkpoint directory, or a .gguf file (its tokenizer is written to DST)")
    parser.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    parser.add_argument("--to", required=True, choices=("packed", "bf16", "prequantized"), help="variant to write")
    parser.add_argument(
        "--scale-convention",
        choices=("divide", "multiply"),
        default=None,
        help="packed only: 'divide' stores 1/s (linear_class bitlinear; Falcon-E, the default), "
        "'multiply' stores s (linear_class autobitlinear; microsoft 2B4T)",
    )
    parser.add_argument(
        "--dtype",
        choices=_DTYPES,
        default=None,
        help="dtype of the dense tensors (embeddings, norms, head): bf16 variant default bfloat16; "
        "packed default: as stored in SRC",
    )
    parser.add_argument(
        "--chat-template", metavar="NAME|FILE", help=CHAT_TEMPLATE_HELP + " to store with DST's tokenizer"
    )
    parser.add_argument(
        "--allow-padded-rows",
        action="store_true",
        help="packed only: store layers whose out_features is not a multiple of 4 with ceil(N/4) byte rows "
        "(bittern loads them; stock transformers cannot, its buffer holds N//4 rows)",
    )
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="REGEX",
        help="plain SRC only: convert only linear layers whose name matches (repeatable; default: every "
        "nn.Linear inside the decoder blocks)",
    )
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="REGEX", help="plain SRC only: never convert these"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def _add_export(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="export a checkpoint to another runtime's format (gguf: llama.cpp)",
        description="Export a checkpoint to a single file for another runtime. Targets: gguf (llama.cpp).",
    )
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    gguf = targets.add_parser(
        "gguf",
        help="one GGUF file for llama.cpp / llama-cpp-python (ternary layers as TQ2_0 or TQ1_0)",
        description=(
            "Write SRC (any checkpoint directory bittern reads, with its tokenizer) as one GGUF file that\n"
            "llama.cpp loads and computes as the same model: Llama-style models (Llama, Falcon-E) as llama.cpp's\n"
            "'llama' architecture, BitNetForCausalLM (sub-norms) as 'bitnet'; the tokenizer (byte-level BPE or\n"
            "SentencePiece BPE), special tokens, chat template and rope settings; ternary layers as --type.\n"
            "\n"
            "Row policy: a GGUF row is a layer's input dimension K. TQ1_0/TQ2_0 need K % 256 == 0; other\n"
            "ternary layers are stored as Q8_0 (K % 32 == 0, exact up to its fp16 block scale) or else F16, and\n"
            "one warning lists them. Ternary scales are stored as fp16 (codes are exact).\n"
            "\n"
            "llama.cpp's 'bitnet' graph computes the feed-forward with SiLU and ties the LM head to the\n"
            "embedding: a relu2 BitNet model (like microsoft/bitnet-b1.58-2B-4T) is refused unless\n"
            "--allow-activation-mismatch, because llama.cpp would compute a different model.\n"
            "\n"
            "The file is written under a temporary name and renamed into place: a failure leaves nothing behind.\n"
            "Read a GGUF file back with bittern.load_model('model.gguf')."
        ),
        epilog=(
            "examples:\n"
            "  bittern export gguf ./model-packed model.gguf\n"
            "  bittern export gguf ./model-packed model-tq1.gguf --type tq1_0 --embeddings q8_0\n"
            "  bittern export gguf ./falcon-e ./falcon-e.gguf --overwrite\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gguf.add_argument("src", help="source checkpoint directory (with tokenizer files)")
    gguf.add_argument("out", help="the .gguf file to write (must not exist unless --overwrite)")
    gguf.add_argument(
        "--type",
        dest="weight_type",
        choices=("tq2_0", "tq1_0", "q8_0", "f16"),
        default="tq2_0",
        help="type of the ternary layers: tq2_0 (2.06 bits/weight, default, llama.cpp's fastest ternary kernel), "
        "tq1_0 (1.69 bits/weight); q8_0 and f16 write dense references for comparisons",
    )
    gguf.add_argument(
        "--embeddings",
        choices=("f16", "f32", "bf16", "q8_0"),
        default="f16",
        help="type of the token embedding, an untied LM head and any linear layer left in full precision (default f16)",
    )
    gguf.add_argument(
        "--allow-activation-mismatch",
        action="store_true",
        help="write a relu2 BitNet model under llama.cpp's bitnet graph anyway (llama.cpp computes SiLU there: "
        "a different model)",
    )
    gguf.add_argument(
        "--pre-tokenizer",
        default=None,
        metavar="NAME",
        help="llama.cpp pre-tokenizer name (tokenizer.ggml.pre) when bittern cannot detect it from tokenizer.json "
        "(it detects gpt-2, smollm and llama-bpe)",
    )
    gguf.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    gguf.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "inspect",
        help="describe and validate a checkpoint",
        description=(
            "Print the format, architecture, parameter counts, bits per linear weight, file size and tokenizer of a "
            "checkpoint directory or GGUF file, after validating it: packed codes in {-1,0,1}, scales finite and "
            "> 0, no NaN/Inf, shapes consistent. Exits with status 2 and one message on an invalid checkpoint."
        ),
    )
    parser.add_argument("path", help="checkpoint directory or .gguf file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="perplexity of a checkpoint on a text file",
        description=(
            "Perplexity of MODEL (any checkpoint bittern reads, with its tokenizer; a GGUF file carries its own) on\n"
            "the text "
            "in --data, tokenized as one sequence (the tokenizer's BOS once at the start, no other special tokens).\n"
            "\n"
            "Strided windows: a window is one forward pass over --window tokens; windows start every --stride\n"
            "tokens; each window scores only the tokens no earlier window scored. Every token after the first is\n"
            "scored exactly once, with at least window - stride + 1 tokens of context.\n"
            "--stride equal to --window gives disjoint windows (fastest); a smaller stride gives more context\n"
            "(a lower perplexity on a real model) for window/stride times the compute."
        ),
        epilog="examples:\n  bittern eval ./model-packed --data wiki.txt\n"
        "  bittern eval ./model-bf16 --data docs.jsonl --window 512 --stride 512 --json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model", help="checkpoint directory (packed, bf16, prequantized or plain) with its tokenizer, or a .gguf file"
    )
    parser.add_argument(
        "--adapter", metavar="DIR", help="a LoRA adapter directory to evaluate on MODEL (base + adapter)"
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help='UTF-8 text file (.txt, .md, .rst, ...) or .jsonl with a "text" field per line',
    )
    parser.add_argument(
        "--window", type=_positive_int, default=None, help="tokens per forward pass (default: min(max positions, 1024))"
    )
    parser.add_argument(
        "--stride",
        type=_positive_int,
        default=None,
        help="tokens between window starts, 1..window (default: window // 2); each window after the first "
        "scores only its last STRIDE tokens",
    )
    parser.add_argument(
        "--max-tokens", type=_positive_int, default=None, help="score only the first N tokens of the text"
    )
    parser.add_argument("--dtype", choices=_DTYPES, default=None, help="dtype of the dense weights (default: float32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from bittern.train.presets import PRESETS

    presets = "\n".join(f"  {name:<12} {preset.description}" for name, preset in PRESETS.items())
    parser = sub.add_parser(
        "train",
        help="train a ternary model: from scratch, by converting a full-precision model, or continued",
        description=(
            "Train a ternary (BitNet b1.58) model on Hugging Face Trainer and export it as packed, bf16 and\n"
            "prequantized variants, each evaluated on held-out text in OUT/report.md.\n"
            "\n"
            "  --preset NAME         train from scratch (a tokenizer is trained on the data unless --tokenizer)\n"
            "  --model DIR           a full-precision checkpoint is CONVERTED: λ warms up from 0 to 1 (linear by\n"
            "                        default, over half the steps) and --distill-weight adds KL distillation from\n"
            "                        the frozen original; a bittern variant or Falcon-E / 2B4T checkpoint is\n"
            "                        CONTINUED (fine-tuned) as ternary from the start, or with --lora-rank\n"
            "                        adapted by LoRA adapters on its frozen packed layers\n"
            "  --data                text files, directories, .jsonl ('text' or chat 'messages', the latter through\n"
            "                        TRL's SFTTrainer and the tokenizer's chat template), or a saved `datasets`\n"
            "                        directory; none = the embedded corpus (Python's pydoc topics + docstrings)\n"
            "\n"
            "OUT is a run directory: checkpoints are renamed into place whole, so after any interruption (even\n"
            "kill -9) the same command resumes from the last one and continues exactly as an uninterrupted run;\n"
            "on a finished run it trains no further step and only re-exports and re-evaluates the variants.\n"
            "Under torchrun / accelerate launch the same command trains with DDP (or FSDP2 with --fsdp)."
        ),
        epilog=(
            f"presets:\n{presets}\n\n"
            "examples:\n"
            "  bittern train --out runs/tiny --preset tiny --steps 500\n"
            "  bittern train --out runs/conv --model ./llama-fp --data ./text --lambda-schedule sigmoid \\\n"
            "      --distill-weight 1.0 --steps 2000 --lr 2e-4\n"
            "  torchrun --nproc-per-node 2 -m bittern.cli train --out runs/ddp --preset small\n"
            "  bittern train --out runs/lora --model runs/tiny/variants/packed --data ./my-text --lora-rank 16 \\\n"
            "      --lr 1e-3 --steps 300 --lora-heal-steps 50\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_options(parser)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="train a small ternary model on Python's own docs, export and evaluate it (no downloads)",
        description=(
            "Train a byte-level BPE tokenizer and the 'tiny' ternary Llama from scratch on English text that ships "
            "with Python (the help() topics and the standard library's docstrings; every 20th document held "
            "out), export the packed, bf16 and prequantized variants, reload each and measure its held-out "
            "perplexity, generate a sample from the packed model, and print a table next to a unigram "
            "baseline. About 3-4 minutes on 2 CPU cores; re-running on the same --out resumes."
        ),
    )
    parser.add_argument("--out", default="bittern-demo", help="output directory (default: ./bittern-demo)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the model, data order and sample")
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Model, decoding and sampling options shared by ``generate`` and ``chat``."""
    parser.add_argument(
        "model", help="checkpoint directory (packed, bf16, prequantized or plain) with its tokenizer, or a .gguf file"
    )
    parser.add_argument(
        "--adapter", metavar="DIR", help="a LoRA adapter directory (bittern train --lora-rank's adapter/) run on MODEL"
    )
    parser.add_argument(
        "--chat-template", metavar="NAME|FILE", help=CHAT_TEMPLATE_HELP + "; replaces the tokenizer's for this run"
    )
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=None,
        help="most tokens per reply, >= 1 (default: generate 128, chat 256)",
    )
    decoding.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples from softmax(logits / T)"
    )
    decoding.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens only")
    decoding.add_argument(
        "--top-p", type=float, default=None, help="sample among the most likely tokens whose probability reaches P"
    )
    decoding.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="> 1 discourages tokens already in the text (prompt included; transformers' definition)",
    )
    decoding.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when the text contains TEXT (repeatable); TEXT is taken literally, so give a newline as a real "
        "one: --stop $'\\n' in bash or zsh",
    )
    decoding.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    runtime.add_argument(
        "--dtype", choices=_DTYPES, default=None, help="activations and dense weights (default: bfloat16 on GPU, "
        "float32 on CPU)"
    )  # fmt: skip
    runtime.add_argument(
        "--weights",
        choices=("ternary", "dense"),
        default="ternary",
        help="ternary: packed TernaryLinear layers, int8 activations (default); dense: the same layers as "
        "nn.Linear holding Wt*s (the bf16 variant's numbers)",
    )
    runtime.add_argument(
        "--max-seq-len", type=_positive_int, default=None, help="longest prompt + reply (default: 2048)"
    )
    runtime.add_argument(
        "--no-cuda-graph", action="store_true", help="run the decode step eagerly instead of replaying a CUDA graph"
    )
    runtime.add_argument(
        "--no-compile",
        action="store_true",
        help="capture the decode step without torch.compile (starts faster; each step runs more, smaller kernels)",
    )


def _add_generate(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "generate",
        help="continue prompts with a model (streams a single prompt to the terminal)",
        description=(
            "Generate text with MODEL (any checkpoint directory bittern reads) on bittern's engine: static KV\n"
            "cache, the decode step replayed from a CUDA graph on a GPU, ternary layers on bittern's kernels.\n"
            "One --prompt is streamed to the terminal as it is generated (after the prompt itself); several are\n"
            "decoded together as one batch and printed at the end, separated by lines of dashes. Timings go to\n"
            "stderr. Decoding is greedy unless --temperature > 0."
        ),
        epilog=(
            "examples:\n"
            "  bittern generate ./model-packed --prompt 'The import statement'\n"
            "  bittern generate ./model-packed --prompt 'Once' --prompt 'A list' --temperature 0.8 --top-p 0.9\n"
            "  bittern generate ./chat-model --chat --prompt 'What is a ternary weight?' --stop $'\\n\\n'\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_engine_options(parser)
    parser.add_argument(
        "--prompt", action="append", required=True, metavar="TEXT", help="text to continue (repeatable: a batch)"
    )
    parser.add_argument(
        "--chat", action="store_true", help="wrap each prompt as one user message in the tokenizer's chat template"
    )
    parser.add_argument("--no-stream", action="store_true", help="print the text once it is complete")
    parser.set_defaults(default_new_tokens=128)


def _add_chat(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "chat",
        help="talk with a model through its chat template (reads turns from stdin)",
        description=(
            "An interactive conversation with MODEL through its tokenizer's chat template (or --chat-template),\n"
            "history kept. Each line read from stdin is one user turn; the reply streams to stdout. /reset forgets\n"
            "the history; /exit, /quit or end of input (Ctrl-D, or the end of a pipe) ends. Works with piped\n"
            "input: printf 'Hi\\nWhat is 2+2?\\n' | bittern chat ./model  (each turn is then echoed as '> TEXT'\n"
            "and replies are separated by a blank line).\n"
            "\n"
            "A model bittern trained on plain text has no chat template: pass --chat-template plain (or store one\n"
            "with bittern convert --chat-template); one trained on chat data has one."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_engine_options(parser)
    parser.add_argument("--system", default=None, help="a system message that opens the conversation")
    parser.set_defaults(default_new_tokens=256)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API with continuous batching",
        description=(
            "Serve MODEL (any checkpoint directory bittern reads, with its tokenizer) on an OpenAI-compatible API:\n"
            "POST /v1/completions and /v1/chat/completions (streaming with stream=true), GET /v1/models, /health\n"
            "and /metrics (Prometheus). Requests join the running batch between decode steps and leave it when\n"
            "they end. SIGINT/SIGTERM stops accepting connections, lets running requests finish for up to\n"
            "--shutdown-timeout seconds and cancels the rest. Needs the serve extra: pip install -e '.[serve]'."
        ),
        epilog=(
            "examples:\n"
            "  bittern serve ./model-packed --port 8000\n"
            "  bittern serve ./model-packed --max-batch 32 --api-key secret --served-model-name my-model\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="checkpoint directory (packed, bf16, prequantized or plain) with its tokenizer")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument(
        "--max-batch", type=int, default=None, help="rows decoded together, the KV cache's rows (default: 64 on a "
        "GPU, 8 on the CPU)"
    )  # fmt: skip
    parser.add_argument("--max-seq-len", type=int, default=None, help="longest prompt + reply (default: 2048)")
    parser.add_argument("--max-queue", type=int, default=None, help="requests waiting for a row before new ones "
                        "are answered 429 (default 256)")  # fmt: skip
    parser.add_argument("--prefill-tokens", type=int, default=None, help="the most prompt slots (prompts x padded "
                        "length) prefilled between two decode steps (default 2048): lower bounds the pause running "
                        "requests see when prompts arrive; a longer prompt is prefilled in chunks of this many "
                        "tokens, one between each two decode steps")  # fmt: skip
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype", choices=_DTYPES, default=None, help="activations and dense weights (default: bfloat16 on GPU, "
        "float32 on CPU)"
    )  # fmt: skip
    parser.add_argument(
        "--weights", choices=("ternary", "dense"), default="ternary",
        help="ternary: packed TernaryLinear layers (default); dense: nn.Linear holding Wt*s (the bf16 variant)",
    )  # fmt: skip
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: MODEL's "
                        "directory name)")  # fmt: skip
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds running requests get to "
                        "finish after SIGINT/SIGTERM (default 30)")  # fmt: skip
    parser.add_argument("--no-cuda-graph", action="store_true", help="run the decode step and prefill eagerly")
    parser.add_argument("--no-compile", action="store_true", help="capture the decode step without torch.compile")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bittern",
        description="bittern: ternary (BitNet b1.58) language models — train, convert, inspect, evaluate, generate.",
    )
    parser.add_argument("--version", action="version", version=f"bittern {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_convert(sub)
    _add_export(sub)
    _add_inspect(sub)
    _add_eval(sub)
    _add_train(sub)
    _add_demo(sub)
    _add_generate(sub)
    _add_chat(sub)
    _add_serve(sub)
    return parser


def _refuse_existing_output(path: str, overwrite: bool) -> None:
    from pathlib import Path

    from bittern.errors import OutputExistsError

    if Path(path).exists() and not overwrite:
        raise OutputExistsError(f"output '{path}' already exists; pass --overwrite to replace it")


def _check_adapter(adapter: str | None) -> None:
    from pathlib import Path

    from bittern.errors import MissingFileError

    if adapter is None:
        return
    if not Path(adapter).exists():
        raise MissingFileError("--adapter: the directory does not exist", adapter)
    if not Path(adapter).is_dir():
        raise MissingFileError("--adapter: is a file, not a LoRA adapter directory", adapter)
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise MissingFileError("--adapter: not a LoRA adapter directory (no adapter_config.json)", adapter)


def _check_patterns(args: argparse.Namespace) -> None:
    """Raise :class:`~bittern.errors.ConfigError` naming the option of the first ``--include`` / ``--exclude``
    pattern that is not a regular expression."""
    import re

    from bittern.errors import ConfigError

    for option, patterns in (("--include", args.include), ("--exclude", args.exclude)):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{option} {pattern!r} is not a valid regular expression ({exc})") from exc


def validate(args: argparse.Namespace) -> None:
    """Check the options that need no model, before anything is loaded or printed.

    Raises:
        BitternError: the first bad option (a :class:`~bittern.errors.ConfigError` naming it, or an
            :class:`~bittern.errors.OutputExistsError` for an output that exists without ``--overwrite``).
    """
    from bittern.errors import ConfigError
    from bittern.tokenization import check_chat_template_spec

    check_chat_template_spec(getattr(args, "chat_template", None))
    _check_adapter(getattr(args, "adapter", None))
    if args.command == "convert":
        _refuse_existing_output(args.dst, args.overwrite)
        _check_patterns(args)
        for option, given in (("--scale-convention", args.scale_convention is not None),
                              ("--allow-padded-rows", args.allow_padded_rows)):  # fmt: skip
            if given and args.to != "packed":
                raise ConfigError(f"{option} applies to --to packed only, not --to {args.to}")
    elif args.command == "export":
        _refuse_existing_output(args.out, args.overwrite)
    elif args.command in ("generate", "chat"):
        from bittern.engine.sampling import SamplingParams

        SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
        if args.command == "generate" and args.chat_template is not None and not args.chat:
            raise ConfigError("--chat-template applies to chat prompts: add --chat (or use bittern chat)")
        if args.max_seq_len is not None and args.max_seq_len < 2:
            raise ConfigError(f"--max-seq-len must be at least 2, got {args.max_seq_len}")
        if args.max_seq_len is not None and args.max_new_tokens is not None and args.max_new_tokens >= args.max_seq_len:
            raise ConfigError(
                f"--max-new-tokens ({args.max_new_tokens}) leaves no room for a prompt in --max-seq-len "
                f"({args.max_seq_len})"
            )
    elif args.command == "eval" and args.window is not None and args.window < 2:
        raise ConfigError(f"--window must be at least 2, got {args.window}")
    elif args.command == "serve":
        _check_serve_options(args)


def _check_serve_options(args: argparse.Namespace) -> None:
    """Raise :class:`~bittern.errors.ConfigError` naming the first out-of-range numeric ``bittern serve`` option,
    before the model loads (the socket's bind would otherwise fail only after it)."""
    import math

    from bittern.errors import ConfigError

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must lie in 0..65535 (0: any free port), got {args.port}")
    for option, value, least in (("--max-batch", args.max_batch, 1), ("--max-seq-len", args.max_seq_len, 2),
                                 ("--max-queue", args.max_queue, 1),
                                 ("--prefill-tokens", args.prefill_tokens, 1)):  # fmt: skip
        if value is not None and value < least:
            raise ConfigError(f"{option} must be at least {least}, got {value}")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
        raise ConfigError(f"--shutdown-timeout must be a finite number of seconds >= 0, got {args.shutdown_timeout}")


def _run(args: argparse.Namespace) -> int:
    validate(args)
    if args.command == "convert":
        import torch

        from bittern.checkpoint import convert_checkpoint
        from bittern.convert import ConversionPolicy

        out = convert_checkpoint(
            args.src,
            args.dst,
            args.to,
            scale_convention=args.scale_convention or "divide",
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            allow_padded_rows=args.allow_padded_rows,
            policy=ConversionPolicy(include=tuple(args.include), exclude=tuple(args.exclude)),
            overwrite=args.overwrite,
            chat_template=args.chat_template,
        )
        print(f"wrote {args.to} checkpoint to {out}")
        return 0
    if args.command == "export":
        import warnings

        from bittern.export import RowFallbackWarning, export_gguf

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RowFallbackWarning)
            result = export_gguf(
                args.src,
                args.out,
                args.weight_type,
                args.embeddings,
                overwrite=args.overwrite,
                allow_activation_mismatch=args.allow_activation_mismatch,
                pre_tokenizer=args.pre_tokenizer,
                progress=False if args.quiet else None,
            )
        for warning in caught:
            print(f"bittern: warning: {warning.message}", file=sys.stderr)
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(result.type_counts().items()))
        print(
            f"wrote {result.path} ({result.size_bytes / 2**20:.1f} MiB, llama.cpp architecture "
            f"'{result.architecture}'; tensors: {counts})"
        )
        return 0
    if args.command == "inspect":
        from bittern.inspection import inspect_checkpoint

        report = inspect_checkpoint(args.path)
        print(json.dumps(report.as_dict(), indent=2) if args.json else "\n".join(report.lines()))
        return 0
    if args.command == "eval":
        from bittern.eval import describe_variant, evaluate_file

        variant = describe_variant(args.model)
        result = evaluate_file(
            args.model,
            args.data,
            window=args.window,
            stride=args.stride,
            dtype=args.dtype,
            device=args.device,
            max_tokens=args.max_tokens,
            adapter=args.adapter,
        )
        report = {
            "model": args.model,
            "adapter": args.adapter,
            "variant": variant,
            "data": args.data,
            "dtype": args.dtype or "float32",
            **result.as_dict(),
        }
        if args.json:
            print(json.dumps(report))
        else:
            print(f"model:       {args.model}")
            if args.adapter:
                print(f"adapter:     {args.adapter}")
            print(f"variant:     {variant}")
            print(f"data:        {args.data}")
            print(f"tokens:      {result.tokens:,} scored")
            print(f"mean NLL:    {result.mean_nll:.4f} nats/token")
            print(f"perplexity:  {result.perplexity:.4f}")
            print(f"window:      {result.window} tokens, stride {result.stride}")
        return 0
    if args.command == "train":
        from bittern.train import TrainConfig, train

        config = TrainConfig.from_options(args)
        result = train(config)
        if os.environ.get("RANK", "0") == "0":
            print(f"run finished: {result.run_dir / 'report.md'}")
        return 0
    if args.command in ("generate", "chat"):
        return _run_engine(args)
    if args.command == "serve":
        from bittern.serve import serve

        serve(
            args.model,
            host=args.host,
            port=args.port,
            served_model_name=args.served_model_name,
            api_key=args.api_key,
            max_queue=args.max_queue,
            prefill_tokens=args.prefill_tokens,
            shutdown_timeout=args.shutdown_timeout,
            log_level=args.log_level,
            device=args.device,
            dtype=args.dtype,
            weights=args.weights,
            max_batch=args.max_batch,
            max_seq_len=args.max_seq_len,
            cuda_graph=not args.no_cuda_graph,
            compile=not args.no_compile,
        )
        return 0
    if args.command == "demo":
        from bittern.demo import main as demo_main

        return demo_main(args.out, args.seed, args.steps, progress=not args.quiet)
    raise AssertionError(args.command)


def _run_engine(args: argparse.Namespace) -> int:
    from bittern.engine import load

    engine = load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        weights=args.weights,
        max_seq_len=args.max_seq_len,
        cuda_graph=not args.no_cuda_graph,
        compile=not args.no_compile,
        max_batch=len(args.prompt) if args.command == "generate" else 1,
        adapter=args.adapter,
        chat_template=args.chat_template,
    )
    options = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
        seed=args.seed,
    )
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else args.default_new_tokens
    if args.command == "chat":
        from bittern.engine.chat import chat_loop

        interactive = sys.stdin.isatty()
        chat_loop(
            engine,
            sys.stdin,
            sys.stdout,
            system=args.system,
            prompt="> " if interactive else "",
            transcript=not interactive,
            max_new_tokens=max_new_tokens,
            **options,
        )
        return 0
    if args.chat:
        prompts = [engine.chat_prompt([{"role": "user", "content": text}]) for text in args.prompt]
    else:
        prompts = engine.encode(args.prompt)
    engine.check_request(prompts, max_new_tokens)  # before the prompt is echoed
    stream = len(prompts) == 1 and not args.no_stream
    if stream and not args.chat:
        sys.stdout.write(args.prompt[0])
        sys.stdout.flush()
    result = engine.generate_ids(prompts, max_new_tokens, stream=stream, **options)
    if stream:
        print()
    else:
        for index, (prompt, text) in enumerate(zip(args.prompt, result.texts, strict=True)):
            if index:
                print("-" * 40)
            print(text if args.chat else prompt + text)
    print(
        f"[{result.prefill_tokens} prompt tokens in {result.prefill_seconds:.3f} s; {result.decode_tokens} tokens "
        f"decoded at {result.decode_tokens_per_second:.1f} tokens/s; finished: {', '.join(result.finish_reasons)}]",
        file=sys.stderr,
    )
    return 0


def interrupted_message(args: argparse.Namespace) -> str:
    """The one line printed after Ctrl-C: what state the interrupted command left, and how to go on."""
    if args.command == "train":
        return "bittern: interrupted; run the same command again to resume from the last checkpoint"
    if args.command == "demo":
        return "bittern: interrupted; run the same bittern demo command again to resume from the last checkpoint"
    if args.command == "convert":
        return f"bittern: interrupted; nothing was written ('{args.dst}' is as it was)"
    if args.command == "export":
        return f"bittern: interrupted; nothing was written ('{args.out}' is as it was)"
    return "bittern: interrupted"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; bittern's own errors print one line (``bittern: error: ...``) and exit with status 2; Ctrl-C
    prints one line (:func:`interrupted_message`) and exits with status 130."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except BitternError as exc:
        print(f"bittern: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(("\n" if args.command in ("generate", "chat") else "") + interrupted_message(args), file=sys.stderr)
        return EXIT_INTERRUPTED


def console_main() -> NoReturn:
    """The ``bittern`` command: :func:`main`, then exit with its status. Once the verb has returned (its outputs
    complete and in place), Ctrl-C is ignored: the interpreter's teardown can take a moment, and an interrupt
    there would give a finished job exit status 130 without a word."""
    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)


if __name__ == "__main__":
    console_main()
