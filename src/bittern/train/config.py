"""The settings of one training run, validated up front so bad configuration fails before any work."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bittern.errors import ConfigError
from bittern.train.presets import PRESETS, get_preset
from bittern.train.schedules import LAMBDA_SCHEDULES, LR_SCHEDULES

#: Settings that do not change the numbers of a run: changing them does not block a resume. ``loss_chunk`` changes
#: only how the loss is computed (the same value and gradients up to float rounding), not what is trained; a run
#: stored before it existed resumes too.
RESUME_NEUTRAL = ("out", "progress", "export", "eval_every", "save_every", "log_every", "loss_chunk")


CHAT_TEMPLATE_HELP = (
    "a chat template: 'plain' (User:/Assistant: turns, each ended by the EOS token; bittern's default for chat "
    "data), 'chatml' (for tokenizers with <|im_start|>/<|im_end|>), or a Jinja file"
)
"""What ``--chat-template`` takes, for every command that has the option."""

OPTION_GROUPS = {
    "source": "what to train",
    "data": "data",
    "optimisation": "optimisation",
    "conversion": "conversion of a full-precision model",
    "lora": "LoRA (adapters on a frozen packed base; needs --model pointing at a ternary checkpoint)",
    "run": "run",
}
"""The groups of ``bittern train --help``, in order: a :class:`TrainConfig` field's ``group`` names one."""


def _option(
    default: Any = dataclasses.MISSING, *, group: str, help: str, factory: Callable[[], Any] | None = None, **cli: Any
) -> Any:
    """A :class:`TrainConfig` field with its command-line option, so that the default, the help and the parsing are
    written once (:func:`bittern.train.config.add_train_options` builds the parser from them). ``cli`` may hold
    ``flag`` (default ``--field-name``; for a bool, the flag that stores the opposite of its default),
    ``metavar``, ``choices``, ``parse`` (a str → value function), ``repeat`` (a list built from repeated
    flags) and ``required``. ``help`` may say ``%(default)s``. ``factory`` makes a mutable default per instance."""
    if group not in OPTION_GROUPS:
        raise ValueError(f"unknown option group {group!r}")
    metadata = {"group": group, "help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


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

    out: str = _option(group="source", help="run directory (created, or resumed if it holds this run)", required=True)
    preset: str | None = _option(None, group="source", help="model shape to train from scratch", choices=tuple(PRESETS))
    model: str | None = _option(
        None, group="source", help="checkpoint directory to convert (full precision) or continue (ternary)"
    )
    gguf_file: str | None = _option(
        None, group="source", help="with --model DIR: load DIR/GGUF_FILE through transformers' GGUF reader"
    )
    data: list[str] = _option(
        factory=list, group="data", help="training text (repeatable)", repeat=True, metavar="PATH"
    )
    tokenizer: str | None = _option(
        None, group="data", help="tokenizer directory (default: the model's, or trained locally)"
    )
    chat_template: str | None = _option(
        None,
        group="data",
        metavar="NAME|FILE",
        help=CHAT_TEMPLATE_HELP + " stored "
        "with the run's tokenizer (default: the tokenizer's own; 'plain' for chat "
        "data when it has none)",
    )
    vocab_size: int = _option(4096, group="data", help="size of a locally trained BPE tokenizer (default %(default)s)")
    num_layers: int | None = _option(None, group="source", help="override the preset's number of layers")
    seq_len: int = _option(256, group="data", help="tokens per training sequence (default %(default)s)")
    batch_size: int = _option(
        8, group="optimisation", help="sequences per device per micro-batch (default %(default)s)"
    )
    grad_accum: int = _option(1, group="optimisation", help="micro-batches per optimizer step (default %(default)s)")
    steps: int = _option(1000, group="optimisation", help="optimizer steps (default %(default)s)")
    lr: float = _option(1.5e-3, group="optimisation", help="peak learning rate (default %(default)s)")
    schedule: str = _option(
        "wsd",
        group="optimisation",
        choices=LR_SCHEDULES,
        help="wsd = warmup-stable-decay "
        "(default); cosine; two-stage = BitNet 2B4T (lr drop + no weight decay in the second "
        "half); constant",
    )
    warmup_steps: int | None = _option(None, group="optimisation", help="learning-rate warmup (default 5%% of --steps)")
    decay_fraction: float = _option(
        0.2, group="optimisation", help="wsd: share of steps in the final decay (default %(default)s)"
    )
    weight_decay: float = _option(0.1, group="optimisation", help="AdamW weight decay (default %(default)s)")
    lambda_schedule: str | None = _option(
        None,
        group="conversion",
        choices=LAMBDA_SCHEDULES,
        help="quantization warmup λ 0→1 (default: linear when converting, none otherwise)",
    )
    lambda_warmup_steps: int | None = _option(
        None, group="conversion", help="steps of the λ warmup (default: half of --steps)"
    )
    distill_weight: float = _option(
        0.0, group="conversion", help="weight of the KL distillation term (default %(default)s)"
    )
    distill_temperature: float = _option(
        1.0, group="conversion", help="distillation softmax temperature (default %(default)s)"
    )
    eval_fraction: float = _option(0.05, group="data", help="share of the data held out (default %(default)s)")
    eval_every: int | None = _option(
        None, group="run", help="steps between held-out evaluations (default: --steps / 5)"
    )
    eval_tokens: int = _option(65536, group="data", help="held-out tokens evaluated (default %(default)s)")
    save_every: int | None = _option(None, group="run", help="steps between checkpoints (default: --steps / 10)")
    log_every: int = _option(10, group="run", help="steps between logs (default %(default)s)")
    seed: int = _option(
        0, group="optimisation", help="seed of the model, data order and tokenizer (default %(default)s)"
    )
    fsdp: bool = _option(False, group="run", help="shard with FSDP2 under torchrun (default: DDP)")
    loss_chunk: int = _option(
        0,
        group="optimisation",
        metavar="N",
        help="compute the loss N tokens at a time, "
        "recomputing each chunk's LM-head logits in the backward instead of keeping them: the "
        "loss then holds O(N x vocab) floats instead of O(batch x seq-len x vocab) (float32 "
        "logits and their gradients: GiBs at a 128k vocabulary, most of a LoRA run's peak), "
        "for one extra LM-head product per step; the same loss and gradients up to rounding. "
        "Text data only; not with --distill-weight (it needs the full logits) or --fsdp "
        "(default 0: transformers' loss over the full logits)",
    )
    lora_rank: int | None = _option(
        None,
        group="lora",
        help="train LoRA adapters of this rank instead of the whole "
        "model; the base is loaded packed (2 bits per weight) and stays bit-identical. "
        "Writes OUT/adapter (PEFT format) and OUT/variants/merged",
    )
    lora_alpha: float | None = _option(
        None, group="lora", help="LoRA alpha; the update is scaled by alpha/rank (default 2*rank)"
    )
    lora_targets: list[str] = _option(
        factory=list,
        group="lora",
        metavar="NAMES",
        parse=lambda text: [t.strip() for t in text.split(",") if t.strip()],
        help="comma-separated module names to adapt, e.g. q_proj,v_proj (default: every ternary layer)",
    )
    lora_dropout: float = _option(0.0, group="lora", help="dropout on the adapters' input (default %(default)s)")
    lora_heal_steps: int = _option(
        0,
        group="lora",
        help="after merging, train the merged latent weights this many "
        "steps (quantization-aware) and write OUT/variants/merged-healed (default 0: no "
        "heal)",
    )
    lora_heal_lr: float = _option(1e-3, group="lora", help="peak learning rate of the heal (default %(default)s)")
    lora_merge_rounding: str = _option(
        "nearest",
        group="lora",
        choices=("nearest", "stochastic"),
        help="how "
        "variants/merged rounds base + update to ternary codes: nearest (the weight "
        "rule on the latent) or stochastic (at the base's scale: keeps small updates "
        "in expectation)",
    )
    export: bool = _option(True, group="run", flag="--no-export", help="skip exporting and evaluating the variants")
    progress: bool = _option(True, group="run", flag="--quiet", help="no progress bar")

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

    @classmethod
    def from_options(cls, namespace: argparse.Namespace) -> TrainConfig:
        """The config of parsed ``bittern train`` options (:func:`add_train_options`); not validated yet."""
        return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})

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


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Add one option per :class:`TrainConfig` field to ``parser``, in :data:`OPTION_GROUPS` (each field's ``dest``
    is its name; the defaults are the dataclass's). Parse, then :meth:`TrainConfig.from_options`."""
    groups = {key: parser.add_argument_group(title) for key, title in OPTION_GROUPS.items()}
    hints = typing.get_type_hints(TrainConfig)
    for spec in dataclasses.fields(TrainConfig):
        meta = dict(spec.metadata)
        flag = meta.pop("flag", "--" + spec.name.replace("_", "-"))
        group = groups[meta.pop("group")]
        kwargs: dict[str, Any] = {"dest": spec.name, "help": meta.pop("help")}
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        if default is not dataclasses.MISSING:
            kwargs["default"] = default
        kind = hints[spec.name]
        parse = meta.pop("parse", None)
        if meta.pop("repeat", False):
            kwargs["action"] = "append"
        elif kind is bool:
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            kwargs["type"] = parse or next(t for t in (int, float, str) if kind in (t, t | None))
        group.add_argument(flag, **kwargs, **meta)
