"""Hugging Face ``Trainer`` (and TRL ``SFTTrainer``) with what ternary training adds.

* the learning-rate schedules of :mod:`bittern.train.schedules`;
* optional logit distillation from a frozen full-precision teacher: ``loss = CE + w · T² · KL(teacher ‖ student)``
  at temperature ``T``, averaged over the predicted tokens;
* optionally (``loss_chunk``) the language-model loss in chunks of tokens whose logits the backward recomputes
  instead of keeping (:mod:`bittern.train.losses`), so no ``[tokens, vocab]`` logits are held;
* atomic checkpoints: every rank writes into ``<run>/checkpoints/.staging/checkpoint-N``, then rank 0 renames
  it into place, so a killed run leaves either a whole checkpoint or none.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from bittern import reference
from bittern.formats.common import apply_umask_permissions
from bittern.train.losses import chunked_causal_lm_loss, final_hidden_states, output_head
from bittern.train.schedules import lr_lambda

STAGING = ".staging"


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over predicted tokens of ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, in float32.

    Args:
        student_logits, teacher_logits: ``[B, L, V]``.
        labels: int64 ``[B, L]``; position ``i`` predicts ``labels[i + 1]``, and labels of -100 are ignored,
            the same tokens the cross-entropy loss counts.
    """
    mask = labels[:, 1:] != -100
    return reference.distillation_kl(student_logits[:, :-1], teacher_logits[:, :-1], temperature, mask)


class TernaryTrainingMixin:
    """Mixed into :class:`transformers.Trainer` or TRL's ``SFTTrainer``; see the module docstring."""

    def __init__(
        self,
        *args: Any,
        schedule: str = "wsd",
        decay_fraction: float = 0.2,
        warmup_steps: int = 0,
        teacher: nn.Module | None = None,
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
        loss_chunk: int = 0,
        **kwargs: Any,
    ) -> None:
        if loss_chunk and teacher is not None and distill_weight > 0:
            raise ValueError("loss_chunk cannot be combined with distillation, which needs the full logits")
        super().__init__(*args, **kwargs)
        self.bittern_schedule = schedule
        self.bittern_decay_fraction = decay_fraction
        self.bittern_warmup_steps = warmup_steps
        self.teacher = teacher
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self.loss_chunk = loss_chunk
        self._write_staging = False
        self._distill_sums = [0.0, 0.0, 0]  # cross-entropy sum, KL sum, micro-batches since the last log
        if teacher is not None and distill_weight > 0:
            teacher.eval().requires_grad_(False)
            # the distillation term is a mean per micro-batch: let Trainer divide by the accumulation steps
            self.model_accepts_loss_kwargs = False

    # -- schedule ---------------------------------------------------------------------------------------
    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            multiplier = lr_lambda(
                self.bittern_schedule, num_training_steps, self.bittern_warmup_steps, self.bittern_decay_fraction
            )
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, multiplier)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # -- distillation -----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_chunk:
            return self._chunked_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.teacher is None or self.distill_weight <= 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            teacher_logits = self.teacher(**teacher_inputs).logits
        labels = inputs["labels"]
        kl = distillation_kl(outputs.logits, teacher_logits, labels, self.distill_temperature)
        loss = outputs.loss + self.distill_weight * kl
        if model.training:
            self._distill_sums[0] += float(outputs.loss.detach())
            self._distill_sums[1] += float(kl.detach())
            self._distill_sums[2] += 1
        return (loss, outputs) if return_outputs else loss

    # -- chunked loss -----------------------------------------------------------------------------------
    def _chunked_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """What ``Trainer.compute_loss`` computes for a causal LM, with the loss in ``loss_chunk``-token chunks.

        The forward runs through ``model`` (DDP and accelerate's autocast act as usual) with ``logits_to_keep=1``;
        the head then projects the final hidden states chunk by chunk under the same autocast. As in
        ``Trainer.compute_loss``: the sum is divided by ``num_items_in_batch`` (the counted targets of the whole
        accumulated batch) when the model takes loss keyword arguments, and multiplied by the number of processes
        when tokens are averaged across devices (DDP then averages the gradients). The returned outputs hold the
        logits of each row's last position only.
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        divisor = num_items_in_batch if self.model_accepts_loss_kwargs else None
        hidden, outputs = final_hidden_states(model, **inputs)
        with self.accelerator.autocast():
            head = output_head(model)
            loss = chunked_causal_lm_loss(hidden, head, labels, self.loss_chunk, num_items_in_batch=divisor)
        if self.args.average_tokens_across_devices and divisor is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean cross-entropy and KL term since the last log to training logs when distilling."""
        ce, kl, count = self._distill_sums
        if count and "loss" in logs:
            logs = {**logs, "ce": ce / count, "kl": kl / count}
            self._distill_sums = [0.0, 0.0, 0]
        super().log(logs, start_time)

    # -- atomic checkpoints -----------------------------------------------------------------------------
    def _get_output_dir(self, trial):
        base = super()._get_output_dir(trial)
        return os.path.join(base, STAGING) if self._write_staging else base

    def _save_checkpoint(self, model, trial):
        self._write_staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._write_staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            name = f"checkpoint-{self.state.global_step}"
            root = Path(self._get_output_dir(trial))
            final = root / name
            if final.exists():
                shutil.rmtree(final)
            apply_umask_permissions(root / STAGING / name)  # safetensors writes its files private (0600)
            os.replace(root / STAGING / name, final)
            shutil.rmtree(root / STAGING, ignore_errors=True)
            rotate_checkpoints(output_dir=str(root), save_total_limit=self.args.save_total_limit)
        self.accelerator.wait_for_everyone()


class TernaryTrainer(TernaryTrainingMixin, Trainer):
    """:class:`transformers.Trainer` with :class:`TernaryTrainingMixin`."""


def sft_trainer_class() -> type:
    """TRL's ``SFTTrainer`` with :class:`TernaryTrainingMixin` (TRL imported only when chat data is used)."""
    from trl import SFTTrainer

    return type("TernarySFTTrainer", (TernaryTrainingMixin, SFTTrainer), {})
