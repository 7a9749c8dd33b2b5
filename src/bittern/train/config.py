"""The settings of one training run, validated up front so bad configuration fails before any work."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bittern.errors import ConfigError
from bittern.train.presets import get_preset
from bittern.train.schedules import LAMBDA_SCHEDULES, LR_SCHEDULES

#: Settings that do not change the numbers of a run: changing them does not block a resume. ``loss_chunk`` changes
#: only how the loss is computed (the same value and gradients up to float rounding), not what is trained; a run
#: stored before it existed resumes too.
RESUME_NEUTRAL = ("out", "progress", "export", "eval_every", "save_every", "log_every", "loss_chunk")


@dataclass
class TrainConfig:
    """Everything that defines a run. The run directory stores it; re-running with the same settings resumes.

    The mode follows from the source: ``preset`` → from scratch; ``model`` pointing at a full-precision
    checkpoint → conversion (λ warmup, optional distillation from the frozen original); ``model`` pointing at a
    bittern variant (prequantized, packed, bf16) or a Falcon-E / 2B4T checkpoint → continued training or
    fine-tuning. Chat data (jsonl with ``messages``) trains through TRL's ``SFTTrainer``. ``lora_rank`` trains
    LoRA adapters on the ternary ``model`` loaded packed and frozen (:mod:`bittern.train.lora`). ``loss_chunk``
    computes the language-model loss that many tokens at a time without keeping the full logits
    (:mod:`bittern.train.losses`; 0: transformers' loss). ``chat_template`` (a name of
    :data:`bittern.tokenization.CHAT_TEMPLATES` or a Jinja file) is stored with the run's tokenizer; chat data gets
    ``plain`` when the tokenizer has no template.
    """

    out: str
    preset: str | None = None
    model: str | None = None
    gguf_file: str | None = None
    data: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    chat_template: str | None = None
    vocab_size: int = 4096
    num_layers: int | None = None
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 1.5e-3
    schedule: str = "wsd"
    warmup_steps: int | None = None
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    lambda_schedule: str | None = None
    lambda_warmup_steps: int | None = None
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    eval_fraction: float = 0.05
    eval_every: int | None = None
    eval_tokens: int = 65536
    save_every: int | None = None
    log_every: int = 10
    seed: int = 0
    fsdp: bool = False
    loss_chunk: int = 0
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: list[str] = field(default_factory=list)
    lora_dropout: float = 0.0
    lora_heal_steps: int = 0
    lora_heal_lr: float = 1e-3
    lora_merge_rounding: str = "nearest"
    export: bool = True
    progress: bool = True

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad setting."""
        if (self.preset is None) == (self.model is None):
            raise ConfigError("give exactly one of --preset (train from scratch) or --model (convert / continue)")
        if self.preset is not None:
            get_preset(self.preset)
        if self.gguf_file and not self.model:
            raise ConfigError("--gguf-file names a file inside --model's directory; give --model too")
        from bittern.tokenization import check_chat_template_spec

        check_chat_template_spec(self.chat_template)
        positive = {
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "steps": self.steps,
            "log_every": self.log_every,
            "eval_tokens": self.eval_tokens,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown --schedule {self.schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if self.lambda_schedule is not None and self.lambda_schedule not in LAMBDA_SCHEDULES:
            raise ConfigError(
                f"unknown --lambda-schedule {self.lambda_schedule!r}; choose one of {', '.join(LAMBDA_SCHEDULES)}"
            )
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"--warmup-steps must lie in [0, --steps), got {self.warmup_steps}")
        if self.lambda_warmup_steps is not None and not 0 <= self.lambda_warmup_steps <= self.steps:
            raise ConfigError(f"--lambda-warmup-steps must lie in [0, --steps], got {self.lambda_warmup_steps}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"--decay-fraction must lie in [0, 1], got {self.decay_fraction}")
        if self.distill_weight < 0:
            raise ConfigError(f"--distill-weight must be >= 0, got {self.distill_weight}")
        if self.distill_temperature <= 0:
            raise ConfigError(f"--distill-temperature must be positive, got {self.distill_temperature}")
        if self.distill_weight > 0 and self.preset is not None:
            raise ConfigError("--distill-weight needs a full-precision --model as teacher; a preset has none")
        if not 0.0 < self.eval_fraction < 0.5:
            raise ConfigError(f"--eval-fraction must lie in (0, 0.5), got {self.eval_fraction}")
        self._validate_loss_chunk()
        self._validate_lora()
        for name in ("eval_every", "save_every", "num_layers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    def _validate_loss_chunk(self) -> None:
        if self.loss_chunk < 0:
            raise ConfigError(f"--loss-chunk must be >= 0 (0: transformers' loss), got {self.loss_chunk}")
        if self.loss_chunk and self.distill_weight > 0:
            raise ConfigError(
                "--loss-chunk cannot be combined with --distill-weight: distillation compares the student's full "
                "logits with the teacher's, which the chunked loss never builds; drop one of them"
            )
        if self.loss_chunk and self.fsdp:
            raise ConfigError(
                "--loss-chunk does not support --fsdp (the LM head runs outside FSDP's forward); use DDP or drop it"
            )

    def _validate_lora(self) -> None:
        if self.lora_rank is None:
            given = [
                f"--lora-{name.replace('_', '-')}"
                for name, default in (("alpha", None), ("targets", []), ("dropout", 0.0), ("heal_steps", 0))
                if getattr(self, f"lora_{name}") != default
            ]
            if given:
                raise ConfigError(f"{', '.join(given)} need --lora-rank (LoRA is off without it)")
            return
        if self.lora_rank < 1:
            raise ConfigError(f"--lora-rank must be a positive integer, got {self.lora_rank}")
        if self.model is None:
            raise ConfigError(
                "--lora-rank fine-tunes a ternary checkpoint: give --model (a preset has no trained base)"
            )
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ConfigError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora-dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.lora_heal_steps < 0:
            raise ConfigError(f"--lora-heal-steps must be >= 0, got {self.lora_heal_steps}")
        if self.lora_merge_rounding not in ("nearest", "stochastic"):
            raise ConfigError(f"--lora-merge-rounding must be nearest or stochastic, got {self.lora_merge_rounding!r}")
        if self.lora_heal_lr <= 0:
            raise ConfigError(f"--lora-heal-lr must be positive, got {self.lora_heal_lr}")
        excluded = {
            "--distill-weight": self.distill_weight > 0,
            "--lambda-schedule": self.lambda_schedule,
            "--fsdp": self.fsdp,
        }
        for option, value in excluded.items():
            if value:
                raise ConfigError(f"{option} does not apply to LoRA fine-tuning (--lora-rank)")

    @property
    def warmup(self) -> int:
        """Learning-rate warmup steps (default: 5% of the run, at least 1 when the run has 20+ steps)."""
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 20

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def differences(self, stored: dict[str, Any]) -> list[str]:
        """Settings that differ from a stored run's, as ``name: old → new`` (resume-neutral fields ignored)."""
        mine = self.as_dict()
        return [
            f"{name}: {stored.get(name)!r} → {mine[name]!r}"
            for name in mine
            if name not in RESUME_NEUTRAL and stored.get(name) != mine[name]
        ]
