"""Trainer callbacks: the λ and weight-decay schedules, ``metrics.jsonl`` and a progress bar with tokens/s."""

from __future__ import annotations

import json
import time
from pathlib import Path

from torch import nn
from transformers import TrainerCallback

from bittern.convert import set_quantization_strength
from bittern.train.schedules import quantization_strength, weight_decay_value


class QuantizationWarmup(TrainerCallback):
    """Sets λ of every :class:`BitLinear` before each optimizer step (a pure function of the step, so resumes
    see the same λ)."""

    def __init__(self, model: nn.Module, schedule: str, warmup_steps: int) -> None:
        self.model = model
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.current = 1.0

    def _apply(self, step: int) -> None:
        self.current = quantization_strength(self.schedule, step, self.warmup_steps)
        set_quantization_strength(self.model, self.current)

    def on_train_begin(self, args, state, control, **kwargs):
        self._apply(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["lambda"] = self.current


class WeightDecaySchedule(TrainerCallback):
    """Sets the weight decay of the decayed parameter groups before each step (2B4T: off in stage 2)."""

    def __init__(self, schedule: str, peak: float, warmup_steps: int) -> None:
        self.schedule = schedule
        self.peak = peak
        self.warmup_steps = warmup_steps

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None or self.peak == 0:
            return
        value = weight_decay_value(self.schedule, state.global_step, state.max_steps, self.warmup_steps, self.peak)
        for group in optimizer.param_groups:
            if group.get("weight_decay", 0.0) != 0.0 or group.get("bittern_decayed"):
                group["bittern_decayed"] = True
                group["weight_decay"] = value


class MetricsWriter(TrainerCallback):
    """Appends every log (training loss, learning rate, λ, eval loss) to ``metrics.jsonl`` with the step,
    tokens seen and tokens/s. Each start writes an ``{"event": "start"}`` or ``{"event": "resume"}`` record;
    on resume, records past the resumed step are dropped first, so the file always describes one run.

    A step that saves a checkpoint (and the last step) is always logged as well, so the ``loss`` records (each the
    mean since the previous one) cover every step up to each checkpoint: after a resume the file still covers
    every step of the run once (:func:`bittern.train.run.mean_training_objective`)."""

    def __init__(self, path: Path, tokens_per_step: int) -> None:
        self.path = path
        self.tokens_per_step = tokens_per_step
        self._start_time = time.perf_counter()
        self._start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_time = time.perf_counter()
        self._start_step = state.global_step
        if state.is_world_process_zero:
            truncate_metrics(self.path, state.global_step)
            event = {"step": state.global_step, "event": "resume" if state.global_step else "start"}
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(event) + "\n")

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:  # set by DefaultFlowCallback, which runs first
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        elapsed = time.perf_counter() - self._start_time
        record = {
            "step": state.global_step,
            "tokens": state.global_step * self.tokens_per_step,
            "elapsed_s": round(elapsed, 3),
        }
        record.update({k: v for k, v in logs.items() if isinstance(v, int | float | str)})
        done = state.global_step - self._start_step
        if "loss" in logs and elapsed > 0 and done > 0:
            record["tokens_per_s"] = round(done * self.tokens_per_step / elapsed, 1)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records of ``path`` up to ``step`` (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, in order."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class ProgressBar(TrainerCallback):
    """A tqdm bar over optimizer steps with loss, λ, tokens/s and the ETA (rank 0 only)."""

    def __init__(self, tokens_per_step: int, enabled: bool = True) -> None:
        self.tokens_per_step = tokens_per_step
        self.enabled = enabled
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.enabled and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True)
            self._start = time.perf_counter()
            self._start_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            elapsed = time.perf_counter() - self._start
            if elapsed > 0:
                rate = (state.global_step - self._start_step) * self.tokens_per_step / elapsed
                self.bar.set_postfix_str(self._postfix + f" {rate:,.0f} tok/s", refresh=False)

    _postfix = ""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            parts = []
            if "loss" in logs:
                parts.append(f"loss {logs['loss']:.3f}")
            if "lambda" in logs and logs["lambda"] < 1:
                parts.append(f"λ {logs['lambda']:.2f}")
            if "eval_loss" in logs:
                self.bar.write(f"step {state.global_step}: held-out loss {logs['eval_loss']:.4f}")
            if parts:
                self._postfix = " ".join(parts)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """End the bar (also when training stops early, e.g. on Ctrl-C, so nothing redraws it afterwards)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
