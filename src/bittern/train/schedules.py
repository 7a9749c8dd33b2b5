"""Schedules as pure functions of the optimizer step: learning rate, weight decay and the quantization strength λ.

Every function maps a step ``t`` (0-based, the number of optimizer steps already taken) to a multiplier or a
value; :class:`torch.optim.lr_scheduler.LambdaLR` and the training callbacks call them. Being pure, they make
a resumed run bit-identical to an uninterrupted one: nothing but the step is state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from bittern.errors import ConfigError

LR_SCHEDULES = ("wsd", "cosine", "two-stage", "constant")
LAMBDA_SCHEDULES = ("none", "linear", "sigmoid")

#: Fraction of the peak learning rate that every decaying schedule ends at.
FINAL_LR_FRACTION = 0.1
#: BitNet b1.58 2B4T two-stage recipe: stage 1 ends at this multiplier; stage 2 starts at the second one.
STAGE1_END = 0.5
STAGE2_START = 0.25


def _check(schedule: str, known: tuple[str, ...], what: str) -> None:
    if schedule not in known:
        raise ConfigError(f"unknown {what} {schedule!r}; choose one of {', '.join(known)}")


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def lr_multiplier(schedule: str, step: int, total_steps: int, warmup_steps: int, decay_fraction: float = 0.2) -> float:
    """The learning-rate multiplier (of the peak rate) at optimizer step ``step``.

    * ``wsd`` (warmup-stable-decay, the default): linear warmup, constant, then a linear decay to
      ``FINAL_LR_FRACTION`` over the last ``decay_fraction`` of the steps.
    * ``cosine``: linear warmup, then a cosine from 1 to ``FINAL_LR_FRACTION``.
    * ``two-stage`` (BitNet b1.58 2B4T): linear warmup; stage 1 (first half of the remaining steps) decays
      linearly from 1 to ``STAGE1_END``; at the midpoint the rate drops sharply to ``STAGE2_START`` and stage 2
      decays linearly to ``FINAL_LR_FRACTION * STAGE2_START`` (the paper's mid-training drop and cooldown).
    * ``constant``: linear warmup, then 1.
    """
    _check(schedule, LR_SCHEDULES, "learning-rate schedule")
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    if schedule == "cosine":
        return FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_start = 1.0 - decay_fraction
        if progress <= decay_start or decay_fraction <= 0.0:
            return 1.0
        return 1.0 - (1.0 - FINAL_LR_FRACTION) * (progress - decay_start) / decay_fraction
    if schedule == "two-stage":
        if progress < 0.5:
            return 1.0 - (1.0 - STAGE1_END) * (progress / 0.5)
        return STAGE2_START * (1.0 - (1.0 - FINAL_LR_FRACTION) * (progress - 0.5) / 0.5)
    raise AssertionError(schedule)


def weight_decay_value(schedule: str, step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Weight decay at ``step``: ``peak`` throughout, except ``two-stage`` (2B4T), which turns it off (0) from the
    midpoint of the post-warmup steps (where the learning rate drops), as the 2B4T recipe does."""
    if schedule == "two-stage" and step >= warmup_steps + (total_steps - warmup_steps) / 2:
        return 0.0
    return peak


def quantization_strength(schedule: str, step: int, warmup_steps: int) -> float:
    """λ at ``step``: the weight of the quantized value in ``v + λ·(Q(v) − v)``.

    * ``none``: 1 from the start (training a ternary model, or continuing one).
    * ``linear``: ``(step + 1) / warmup_steps``, reaching exactly 1 at the end of the warmup.
    * ``sigmoid``: a logistic curve centred at half the warmup (steepness 12 over the warmup), rescaled to run
      from exactly 0 at step 0 to exactly 1 at step ``warmup_steps - 1``.
    After the warmup λ is exactly 1.0, so the layers take the exact integer path.
    """
    _check(schedule, LAMBDA_SCHEDULES, "λ schedule")
    if schedule == "none" or warmup_steps <= 0 or step >= warmup_steps - 1:
        return 1.0
    if schedule == "linear":
        return (step + 1) / warmup_steps
    if schedule == "sigmoid":

        def logistic(t: float) -> float:
            return 1.0 / (1.0 + math.exp(-12.0 * (t / max(warmup_steps - 1, 1) - 0.5)))

        low, high = logistic(0), logistic(warmup_steps - 1)
        return (logistic(step) - low) / (high - low)
    raise AssertionError(schedule)


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int, decay_fraction: float) -> Callable[[int], float]:
    """:func:`lr_multiplier` bound to one run, in the form :class:`torch.optim.lr_scheduler.LambdaLR` takes."""
    _check(schedule, LR_SCHEDULES, "learning-rate schedule")

    def multiplier(step: int) -> float:
        return lr_multiplier(schedule, step, total_steps, warmup_steps, decay_fraction)

    return multiplier
