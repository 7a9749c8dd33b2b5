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

import json
import shutil
from pathlib import Path

import torch

from bittern.errors import BitternError, ConfigError
from bittern.train.config import TrainConfig
from bittern.train.data import read_corpus, unigram_perplexity
from bittern.train.inputs import chat_data, chat_template_note, prepare_tokenizer, text_data
from bittern.train.model_setup import prepare_model
from bittern.train.ranks import is_main_process
from bittern.train.results import TrainResult, VariantResult
from bittern.train.variants import VARIANTS, export_and_evaluate, model_for_export

RUN_CONFIG = "run_config.json"
__all__ = ["RUN_CONFIG", "VARIANTS", "TrainResult", "VariantResult", "mean_training_objective", "train"]


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
    if not is_main_process():
        return False  # rank 0 alone checks and creates the directory (the others may look mid-creation)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"--out {run_dir} exists and is not a bittern run directory; choose an empty or new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (RUN_CONFIG + ".tmp")
    tmp.write_text(json.dumps(config.as_dict(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(stored_path)
    return False


def _remove_empty(directories: list[Path]) -> None:
    """Remove ``directories`` (innermost first: a new ``--out`` and the parents made with it) while they are empty;
    a directory something else put a file into meanwhile stays, and so do its parents."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


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
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # the directories this call makes
    resuming = _check_run_directory(config, run_dir)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        corpus = read_corpus(config.data)
        set_seed(config.seed)
        tokenizer = prepare_tokenizer(config, corpus, run_dir)
        prepared = prepare_model(config, tokenizer)
        data = chat_data(config, corpus, tokenizer) if corpus.is_chat else text_data(config, corpus, tokenizer)
        if config.lora_heal_steps and corpus.is_chat:
            raise ConfigError("--lora-heal-steps trains on text blocks; chat data is not supported for healing")
        if config.loss_chunk and corpus.is_chat:
            raise ConfigError(
                "--loss-chunk applies to text data: chat data trains through TRL's SFTTrainer, whose loss already "
                "projects the LM head in chunks without the full logits; drop --loss-chunk"
            )
    except BitternError:
        if not resuming and is_main_process():
            # refused before training: leave no run behind that would refuse the corrected command
            (run_dir / RUN_CONFIG).unlink(missing_ok=True)
            shutil.rmtree(run_dir / "tokenizer", ignore_errors=True)
            _remove_empty(created)
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
            *chat_template_note(config, corpus, tokenizer),
        ],
    )
    if finished_at >= config.steps:
        # A finished run is final: no more steps (Trainer would take one more when resumed at max_steps) and the
        # checkpoints stay as they are. Its trained weights come back from the last checkpoint for the export.
        if config.fsdp:
            if is_main_process():
                print(
                    f"run already finished at step {finished_at}: nothing to train; its variants are in "
                    f"{run_dir / 'variants'} (a finished FSDP run's sharded checkpoint is not re-exported)"
                )
            result.final_loss = mean_training_objective(run_dir / "metrics.jsonl")
            return result
        if is_main_process():
            print(f"run already finished at step {finished_at}: re-exporting and re-evaluating (no training)")
        trainer._load_from_checkpoint(str(last))
    else:
        if last is not None and config.progress and is_main_process():
            print(f"resuming from {last}")
        try:
            trainer.train(resume_from_checkpoint=str(last) if last else None)
        finally:
            progress_bar.close()  # interrupted (Ctrl-C): end the bar before the CLI's message, not after it
    result.final_loss = mean_training_objective(run_dir / "metrics.jsonl")

    from bittern.train.report import plot_curves, write_report

    if config.export and config.lora_rank is not None:
        if is_main_process():
            from bittern.train.lora import export_lora

            model = prepared.model.to(device="cpu", dtype=torch.float32)
            result.variants = export_lora(model, config, run_dir, data.eval_ids, data.train_set, config.progress)
    elif config.export:
        model = model_for_export(trainer, prepared.model, config)
        if model is not None:
            result.variants = export_and_evaluate(model, run_dir, data.eval_ids, config.seq_len, config.progress)
    if is_main_process():
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        write_report(result, config, run_dir / "report.md")
    trainer.accelerator.wait_for_everyone()
    return result
