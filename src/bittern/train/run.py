"""``bittern train``: one run from data to the three exported variants and a report.

Run directory layout (``config.out``)::

    run_config.json     the settings; re-running with the same settings resumes from the last checkpoint
    tokenizer/          the tokenizer (trained locally for a preset without --tokenizer)
    checkpoints/        Trainer checkpoints (model, optimizer, scheduler, RNG), each renamed into place whole
    metrics.jsonl       one JSON record per log: step, tokens, loss, learning rate, λ, held-out loss, tokens/s
    curves.png          loss and learning rate against the step
    variants/packed     Hugging Face packed ternary model (stock transformers loads it)
    variants/bf16       dense Wt/s_w weights, any tool loads it
    variants/prequantized   latent weights, for further training (``--model variants/prequantized``)
    (with --lora-rank: adapter/, variants/merged and variants/merged-healed instead; see bittern.train.lora)
    report.md           held-out perplexity of each variant, the unigram baseline, sizes, the settings
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bittern.checkpoint import load_model, save_model
from bittern.convert import (
    ConversionPolicy,
    select_layers,
    set_quantization_strength,
    ternary_layer_names,
    to_bitlinear,
)
from bittern.errors import BitternError, ConfigError
from bittern.formats import detect_format
from bittern.formats.common import read_config
from bittern.formats.full import latent_layout
from bittern.nn import BitLinear
from bittern.train.config import TrainConfig
from bittern.train.data import (
    Corpus,
    PackedBlocks,
    read_corpus,
    require,
    split_documents,
    token_split,
    tokenize_documents,
    unigram_perplexity,
)
from bittern.train.presets import get_preset

RUN_CONFIG = "run_config.json"
VARIANTS = ("packed", "bf16", "prequantized")


@dataclass
class VariantResult:
    """One exported variant, reloaded from disk and evaluated on the held-out text."""

    variant: str
    path: str
    size_bytes: int
    bits_per_linear_weight: float
    perplexity: float


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    mode: str
    steps: int
    train_tokens: int
    held_out_tokens: int
    unigram_perplexity: float
    final_loss: float | None
    variants: list[VariantResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Prepared:
    model: nn.Module
    teacher: nn.Module | None
    tokenizer: object
    mode: str
    lambda_schedule: str
    lambda_warmup: int
    notes: list[str]


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _check_run_directory(config: TrainConfig, run_dir: Path) -> bool:
    """Create the run directory or check that it belongs to the same settings. True when resuming."""
    stored_path = run_dir / RUN_CONFIG
    if stored_path.exists():
        stored = json.loads(stored_path.read_text(encoding="utf-8"))
        if differences := config.differences(stored):
            raise ConfigError(
                f"{run_dir} holds a run with different settings ({'; '.join(differences)}); "
                "use another --out, or delete the directory to start over"
            )
        return True
    if not _is_main_process():
        return False  # rank 0 alone checks and creates the directory (the others may look mid-creation)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"--out {run_dir} exists and is not a bittern run directory; choose an empty or new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (RUN_CONFIG + ".tmp")
    tmp.write_text(json.dumps(config.as_dict(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(stored_path)
    return False


def _prepare_tokenizer(config: TrainConfig, corpus: Corpus, run_dir: Path):
    """The run's tokenizer, saved once under ``run_dir/tokenizer`` and reloaded from there on resume.

    It gets ``config.chat_template`` when one is given, and :data:`~bittern.tokenization.DEFAULT_CHAT_TEMPLATE` when
    the data is chat and the tokenizer has none (a tokenizer bittern trains never has one).
    """
    from bittern.tokenization import DEFAULT_CHAT_TEMPLATE, set_chat_template
    from bittern.train.tokenizer import load_tokenizer, train_bpe_tokenizer

    saved = run_dir / "tokenizer"
    if saved.exists():
        return load_tokenizer(saved)
    if config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer)
    elif config.model is not None:
        tokenizer = load_tokenizer(config.model, config.gguf_file)
    else:
        documents = corpus.documents or [json.dumps(c) for c in corpus.conversations]
        split = split_documents(len(documents), config.eval_fraction)
        train_docs = [documents[i] for i in split[0]] if split else documents
        tokenizer = train_bpe_tokenizer(train_docs, config.vocab_size)
    if config.chat_template is not None:
        set_chat_template(tokenizer, config.chat_template)
    elif corpus.is_chat and not getattr(tokenizer, "chat_template", None):
        set_chat_template(tokenizer, DEFAULT_CHAT_TEMPLATE)
    if _is_main_process():
        tmp = run_dir / "tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save_pretrained(tmp)
        tmp.replace(saved)
    return tokenizer


def _chat_template_note(config: TrainConfig, corpus: Corpus, tokenizer) -> list[str]:
    """A report note naming the chat template the run's tokenizer carries, when the run chose it."""
    from bittern.tokenization import CHAT_TEMPLATES, DEFAULT_CHAT_TEMPLATE

    template = getattr(tokenizer, "chat_template", None)
    if config.chat_template is not None:
        return [f"chat template: {config.chat_template} (--chat-template)"]
    if corpus.is_chat and template == CHAT_TEMPLATES[DEFAULT_CHAT_TEMPLATE]:
        return [f"chat template: {DEFAULT_CHAT_TEMPLATE} (the default for chat data; --chat-template sets another)"]
    return []


def _checkpoint_step(checkpoint: str | Path) -> int:
    """The optimizer step a Trainer checkpoint directory was saved at (``trainer_state.json``'s global step)."""
    state = Path(checkpoint) / "trainer_state.json"
    try:
        return int(json.loads(state.read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def mean_training_objective(metrics_path: Path) -> float | None:
    """The mean training objective over every step of the run, from ``metrics.jsonl``: each logged ``loss`` is
    the mean over the steps since the previous log, so the logs are weighted by the steps they cover. A resumed
    run's file holds the records of the steps before the interruption too (see :class:`MetricsWriter`), so the
    mean covers the whole run, not only the steps of the last process. None when nothing was logged."""
    from bittern.train.callbacks import read_metrics

    total, steps, previous = 0.0, 0, 0
    for record in read_metrics(metrics_path):
        if "loss" not in record:
            continue
        covered = int(record["step"]) - previous
        if covered > 0:
            total += float(record["loss"]) * covered
            steps += covered
            previous = int(record["step"])
    return total / steps if steps else None


def _source_is_full_precision(config: TrainConfig) -> bool:
    if config.gguf_file:
        return True
    source = Path(config.model)
    if not source.is_dir():
        raise ConfigError(f"--model {source}: not a checkpoint directory")
    raw = read_config(source)
    return detect_format(raw, source) == "full" and latent_layout(raw) is None


def _prepare_model(config: TrainConfig, tokenizer) -> _Prepared:
    notes: list[str] = []
    torch.manual_seed(config.seed)
    if config.preset is not None:
        from transformers import AutoModelForCausalLM

        preset = get_preset(config.preset)
        if preset.vocab_size is not None and len(tokenizer) > preset.vocab_size:
            raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens, more than preset {config.preset}'s vocab")
        model_config = preset.config(
            len(tokenizer),
            config.num_layers,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
        to_bitlinear(model)
        mode, schedule, teacher = "scratch", config.lambda_schedule or "none", None
    elif _source_is_full_precision(config):
        model = _load_full_precision(config)
        teacher = copy.deepcopy(model) if config.distill_weight > 0 else None
        schedule = config.lambda_schedule or "linear"
        to_bitlinear(model, ConversionPolicy(lam=0.0 if schedule != "none" else 1.0))
        mode = "convert"
        if teacher is not None:
            notes.append(f"distillation from the frozen original, KL weight {config.distill_weight}")
    elif config.lora_rank is not None:
        from bittern.train.lora import prepare_lora_model

        if _source_is_full_precision(config):
            raise ConfigError(
                f"--lora-rank needs a ternary --model (packed, bf16 or prequantized); {config.model} is full "
                "precision: convert it first (bittern train --model ... without --lora-rank)"
            )
        model, lora_notes = prepare_lora_model(config)
        notes += lora_notes
        mode, schedule, teacher = "lora", "none", None
    else:
        model = load_model(config.model, layers="bitlinear")
        if not ternary_layer_names(model) and not select_layers(model):
            raise ConfigError(f"--model {config.model}: no linear layers to train as ternary")
        mode, schedule, teacher = "continue", config.lambda_schedule or "none", None
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and config.seq_len > max_positions:
        raise ConfigError(f"--seq-len {config.seq_len} exceeds the model's maximum of {max_positions} positions")
    warmup = config.lambda_warmup_steps if config.lambda_warmup_steps is not None else config.steps // 2
    if schedule != "none":
        notes.append(f"λ warmup: {schedule} over {warmup} steps")
    model.train()
    return _Prepared(model, teacher, tokenizer, mode, schedule, warmup, notes)


def _load_full_precision(config: TrainConfig) -> nn.Module:
    if config.gguf_file:
        from transformers import AutoModelForCausalLM

        path = Path(config.model) / config.gguf_file
        if not path.is_file():
            raise ConfigError(f"--gguf-file {path}: no such file")
        model = AutoModelForCausalLM.from_pretrained(config.model, gguf_file=config.gguf_file, dtype=torch.float32)
        # transformers dequantizes GGUF tensors on load but keeps a GGUF "quantizer" attached, which makes
        # Trainer refuse to train the (float32) weights; nothing quantized remains, so drop the markers.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model
    return load_model(config.model, layers="auto", dtype=torch.float32)


@dataclass
class _Data:
    train_set: object
    eval_set: object | None
    train_ids: torch.Tensor  # int64 [T]: the training token stream (for the unigram baseline)
    eval_ids: torch.Tensor  # int64 [E]: the held-out token stream (for the variants' perplexity)
    train_tokens: int
    how: str


def _text_data(config: TrainConfig, corpus: Corpus, tokenizer) -> _Data:
    """Language modelling: the documents as one token stream, packed into blocks of ``seq_len``."""
    train_ids, held_ids, how = token_split(tokenizer, corpus.documents, config.eval_fraction)
    train_set = PackedBlocks(train_ids, config.seq_len)
    eval_ids = held_ids[: config.eval_tokens + 1]
    eval_set = PackedBlocks(eval_ids, config.seq_len) if eval_ids.numel() > config.seq_len else None
    return _Data(train_set, eval_set, train_ids, eval_ids, train_set.tokens, how)


def _chat_data(config: TrainConfig, corpus: Corpus, tokenizer) -> _Data:
    """Supervised fine-tuning: conversations rendered by TRL through the tokenizer's chat template."""
    datasets = require("datasets", "chat data")
    require("trl", "chat data (TRL's SFTTrainer)")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat data ('messages') needs a tokenizer with a chat template; this one has none")
    conversations = corpus.conversations
    split = split_documents(len(conversations), config.eval_fraction)
    if split is None:
        raise ConfigError(
            f"chat data needs at least {round(1 / config.eval_fraction)} conversations to hold some out "
            f"(found {len(conversations)}); raise --eval-fraction or add conversations"
        )
    train_idx, held_idx = split
    rendered = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    train_ids = torch.tensor(tokenize_documents(tokenizer, [rendered[i] for i in train_idx]), dtype=torch.long)
    eval_ids = torch.tensor(tokenize_documents(tokenizer, [rendered[i] for i in held_idx]), dtype=torch.long)
    train_set = datasets.Dataset.from_list([{"messages": conversations[i]} for i in train_idx])
    eval_set = datasets.Dataset.from_list([{"messages": conversations[i]} for i in held_idx])
    how = f"every {round(1 / config.eval_fraction)}th conversation held out ({len(held_idx)} of {len(conversations)})"
    return _Data(train_set, eval_set, train_ids, eval_ids[: config.eval_tokens + 1], int(train_ids.numel()), how)


def _training_arguments(config: TrainConfig, run_dir: Path, has_eval: bool, chat: bool = False):
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    save_every = config.save_every or max(config.steps // 10, 1)
    eval_every = config.eval_every or max(config.steps // 5, 1)
    kwargs = dict(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=config.log_every,
        save_strategy="steps",
        save_steps=save_every,
        save_total_limit=2,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_every,
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        tf32=cuda or None,  # exact for the integer matmuls (int8 and ternary values fit TF32's mantissa)
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        ddp_find_unused_parameters=False,
    )
    if config.fsdp:
        kwargs["fsdp"] = "full_shard auto_wrap"
        kwargs["fsdp_config"] = {"fsdp_version": 2, "reshard_after_forward": True}
    if chat:
        from trl import SFTConfig

        return SFTConfig(max_length=config.seq_len, packing=False, **kwargs)
    return TrainingArguments(**kwargs)


def train(config: TrainConfig) -> TrainResult:
    """Train (from scratch, by conversion, or continued) as ``config`` says; see the module docstring.

    Re-running with the same ``config`` after an interruption (even SIGKILL) resumes from the last complete
    checkpoint; the resumed losses match an uninterrupted run's. A finished run is not trained again: its
    export and report are redone if missing.
    """
    from transformers import PrinterCallback, set_seed
    from transformers.trainer_utils import get_last_checkpoint
    from transformers.utils import logging as hf_logging

    from bittern.train.callbacks import MetricsWriter, ProgressBar, QuantizationWarmup, WeightDecaySchedule
    from bittern.train.trainer import TernaryTrainer, sft_trainer_class

    config.validate()
    run_dir = Path(config.out)
    resuming = _check_run_directory(config, run_dir)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        corpus = read_corpus(config.data)
        set_seed(config.seed)
        tokenizer = _prepare_tokenizer(config, corpus, run_dir)
        prepared = _prepare_model(config, tokenizer)
        data = _chat_data(config, corpus, tokenizer) if corpus.is_chat else _text_data(config, corpus, tokenizer)
        if config.lora_heal_steps and corpus.is_chat:
            raise ConfigError("--lora-heal-steps trains on text blocks; chat data is not supported for healing")
        if config.loss_chunk and corpus.is_chat:
            raise ConfigError(
                "--loss-chunk applies to text data: chat data trains through TRL's SFTTrainer, whose loss already "
                "projects the LM head in chunks without the full logits; drop --loss-chunk"
            )
    except BitternError:
        if not resuming and _is_main_process():
            # refused before training: leave no run behind that would refuse the corrected command
            (run_dir / RUN_CONFIG).unlink(missing_ok=True)
            shutil.rmtree(run_dir / "tokenizer", ignore_errors=True)
        raise

    args = _training_arguments(config, run_dir, data.eval_set is not None, chat=corpus.is_chat)
    tokens_per_step = config.batch_size * config.grad_accum * config.seq_len * args.world_size
    progress_bar = ProgressBar(tokens_per_step, enabled=config.progress)
    callbacks = [
        QuantizationWarmup(prepared.model, prepared.lambda_schedule, prepared.lambda_warmup),
        WeightDecaySchedule(config.schedule, config.weight_decay, config.warmup),
        MetricsWriter(run_dir / "metrics.jsonl", tokens_per_step),
        progress_bar,
    ]
    teacher = prepared.teacher.to(args.device) if prepared.teacher is not None else None
    trainer_class = sft_trainer_class() if corpus.is_chat else TernaryTrainer
    extra = {"processing_class": tokenizer} if corpus.is_chat else {}
    trainer = trainer_class(
        model=prepared.model,
        args=args,
        train_dataset=data.train_set,
        eval_dataset=data.eval_set,
        callbacks=callbacks,
        schedule=config.schedule,
        decay_fraction=config.decay_fraction,
        warmup_steps=config.warmup,
        teacher=teacher,
        distill_weight=config.distill_weight,
        distill_temperature=config.distill_temperature,
        loss_chunk=config.loss_chunk,
        **extra,
    )
    trainer.remove_callback(PrinterCallback)  # our MetricsWriter and ProgressBar report instead
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / ".staging", ignore_errors=True)
    # checkpoint-N directories appear only whole (renamed from .staging), so the newest one is complete
    last = get_last_checkpoint(str(checkpoints)) if resuming and checkpoints.is_dir() else None
    finished_at = _checkpoint_step(last) if last is not None else 0
    result = TrainResult(
        run_dir=run_dir,
        mode=prepared.mode,
        steps=config.steps,
        train_tokens=data.train_tokens,
        held_out_tokens=int(data.eval_ids.numel()),
        unigram_perplexity=unigram_perplexity(data.train_ids, data.eval_ids, len(tokenizer)),
        final_loss=None,
        notes=[
            f"mode: {prepared.mode}",
            f"data: {corpus.description}; {data.how}",
            *prepared.notes,
            *_chat_template_note(config, corpus, tokenizer),
        ],
    )
    if finished_at >= config.steps:
        # A finished run is final: no more steps (Trainer would take one more when resumed at max_steps) and the
        # checkpoints stay as they are. Its trained weights come back from the last checkpoint for the export.
        if config.fsdp:
            if _is_main_process():
                print(
                    f"run already finished at step {finished_at}: nothing to train; its variants are in "
                    f"{run_dir / 'variants'} (a finished FSDP run's sharded checkpoint is not re-exported)"
                )
            result.final_loss = mean_training_objective(run_dir / "metrics.jsonl")
            return result
        if _is_main_process():
            print(f"run already finished at step {finished_at}: re-exporting and re-evaluating (no training)")
        trainer._load_from_checkpoint(str(last))
    else:
        if last is not None and config.progress and _is_main_process():
            print(f"resuming from {last}")
        try:
            trainer.train(resume_from_checkpoint=str(last) if last else None)
        finally:
            progress_bar.close()  # interrupted (Ctrl-C): end the bar before the CLI's message, not after it
    result.final_loss = mean_training_objective(run_dir / "metrics.jsonl")

    from bittern.train.report import plot_curves, write_report

    if config.export and config.lora_rank is not None:
        if _is_main_process():
            from bittern.train.lora import export_lora

            model = prepared.model.to(device="cpu", dtype=torch.float32)
            result.variants = export_lora(model, config, run_dir, data.eval_ids, data.train_set, config.progress)
    elif config.export:
        model = _model_for_export(trainer, prepared.model, config)
        if model is not None:
            result.variants = export_and_evaluate(model, run_dir, data.eval_ids, config.seq_len, config.progress)
    if _is_main_process():
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        write_report(result, config, run_dir / "report.md")
    trainer.accelerator.wait_for_everyone()
    return result


def _model_for_export(trainer, model: nn.Module, config: TrainConfig) -> nn.Module | None:
    """The trained model in float32 on the CPU with λ = 1, on rank 0 (None on the other ranks).

    Training is over, so the model itself is moved rather than copied (a copy would double its memory on the
    GPU). Under FSDP every rank takes part in gathering the full state, which rank 0 loads into a fresh model.
    """
    if config.fsdp:
        from transformers import AutoModelForCausalLM

        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # a collective: every rank calls it
        if not _is_main_process():
            return None
        exported = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        to_bitlinear(exported, ConversionPolicy.for_layers(ternary_layer_names(model)))
        missing, unexpected = exported.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if exported.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"gathered FSDP state does not fit the model: {missing=} {unexpected=}")
    elif _is_main_process():
        exported = model.to(device="cpu", dtype=torch.float32)
    else:
        return None
    set_quantization_strength(exported, 1.0)
    # what save_pretrained records (Trainer's checkpoints set it on the live model; a model rebuilt from one lacks it)
    exported.config.architectures = [type(exported).__name__]
    return exported.eval()


def export_and_evaluate(
    model: nn.Module, run_dir: Path, held_out_ids: torch.Tensor, seq_len: int, progress: bool = True
) -> list[VariantResult]:
    """Write the three variants under ``run_dir/variants`` and evaluate each one as reloaded from disk."""
    from bittern.eval.perplexity import sliding_window_nll
    from bittern.inspection import inspect_checkpoint

    tokenizer_dir = run_dir / "tokenizer"
    padded = any(m.out_features % 4 for m in model.modules() if isinstance(m, BitLinear))
    results = []
    for variant in VARIANTS:
        destination = run_dir / "variants" / variant
        save_model(
            model,
            destination,
            variant,
            allow_padded_rows=padded,
            # embeddings, norms and head in bf16, as published packed models ship them; latent weights stay fp32
            dtype=torch.bfloat16 if variant != "prequantized" else None,
            tokenizer_source=tokenizer_dir,
            overwrite=True,
        )
        report = inspect_checkpoint(destination)
        reloaded = load_model(destination, device="cuda" if torch.cuda.is_available() else "cpu")
        ppl = sliding_window_nll(reloaded, held_out_ids, window=seq_len, stride=seq_len, progress=progress).perplexity
        results.append(VariantResult(variant, str(destination), report.file_bytes, report.bits_per_linear_weight, ppl))
        if progress:
            print(f"exported {variant:<13} {report.file_bytes / 2**20:8.2f} MiB  held-out perplexity {ppl:.2f}")
    return results
