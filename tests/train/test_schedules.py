"""The learning-rate, weight-decay and quantization-strength (λ) schedules: pure functions of the step."""

from __future__ import annotations

import itertools

import pytest
import torch

from bittern.errors import ConfigError
from bittern.train.schedules import (
    FINAL_LR_FRACTION,
    LAMBDA_SCHEDULES,
    LR_SCHEDULES,
    STAGE1_END,
    STAGE2_START,
    lr_lambda,
    lr_multiplier,
    quantization_strength,
    weight_decay_value,
)


def _curve(schedule: str, total: int, warmup: int, decay_fraction: float = 0.2) -> list[float]:
    return [lr_multiplier(schedule, t, total, warmup, decay_fraction) for t in range(total + 1)]


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_every_schedule_warms_up_linearly_to_exactly_one(schedule: str) -> None:
    curve = _curve(schedule, total=100, warmup=10)
    assert curve[:10] == pytest.approx([(t + 1) / 10 for t in range(10)], abs=1e-12)
    assert curve[9] == 1.0
    assert curve[10] == 1.0  # the first step after the warmup starts at the peak


def test_wsd_is_flat_then_decays_linearly_to_the_final_fraction() -> None:
    total, warmup = 100, 10  # 90 steps after warmup; the decay covers the last 20% of them: steps 82..100
    curve = _curve("wsd", total, warmup, decay_fraction=0.2)
    assert all(value == 1.0 for value in curve[10:83]), "stable phase must hold the peak exactly"
    decay = curve[82:]
    steps = [b - a for a, b in itertools.pairwise(decay)]
    assert all(step < 0 for step in steps)
    assert steps == pytest.approx([steps[0]] * len(steps), rel=1e-9), "the decay must be linear"
    assert curve[total] == pytest.approx(FINAL_LR_FRACTION, abs=1e-12)
    assert lr_multiplier("wsd", 10 * total, total, warmup) == pytest.approx(FINAL_LR_FRACTION), "clamped after the end"
    # no decay at all with decay_fraction 0
    assert set(_curve("wsd", total, warmup, decay_fraction=0.0)[10:]) == {1.0}


def test_cosine_runs_from_one_to_the_final_fraction() -> None:
    total, warmup = 110, 10
    curve = _curve("cosine", total, warmup)
    after = curve[warmup:]
    assert after[0] == pytest.approx(1.0)
    assert curve[warmup + 50] == pytest.approx((1.0 + FINAL_LR_FRACTION) / 2)  # half-way through the cosine
    assert curve[total] == pytest.approx(FINAL_LR_FRACTION, abs=1e-12)
    assert all(b < a for a, b in itertools.pairwise(after))


def test_constant_stays_at_one_after_warmup() -> None:
    assert set(_curve("constant", 50, 5)[4:]) == {1.0}


def test_two_stage_drops_at_the_midpoint_and_ends_at_the_final_fraction_of_stage_two() -> None:
    total, warmup = 10010, 10  # 10000 post-warmup steps: the midpoint is step 5010
    midpoint = warmup + (total - warmup) // 2
    curve = _curve("two-stage", total, warmup)
    stage1, stage2 = curve[warmup:midpoint], curve[midpoint:]
    assert stage1[0] == pytest.approx(1.0)
    assert stage1[-1] == pytest.approx(STAGE1_END, abs=1e-3), "stage 1 decays to STAGE1_END"
    assert stage2[0] == pytest.approx(STAGE2_START), "the rate drops sharply at the midpoint"
    assert curve[total] == pytest.approx(FINAL_LR_FRACTION * STAGE2_START, abs=1e-12)
    assert all(b < a for a, b in itertools.pairwise(stage1))
    assert all(b < a for a, b in itertools.pairwise(stage2))
    assert stage1[-1] - stage2[0] == pytest.approx(STAGE1_END - STAGE2_START, abs=1e-3)


def test_weight_decay_is_switched_off_exactly_where_the_two_stage_rate_drops() -> None:
    total, warmup, peak = 110, 10, 0.1
    for t in range(total + 5):
        lr = lr_multiplier("two-stage", t, total, warmup)
        decay = weight_decay_value("two-stage", t, total, warmup, peak)
        in_stage2 = t >= warmup and lr <= STAGE2_START + 1e-12
        assert decay == (0.0 if in_stage2 else peak), f"step {t}"
    assert weight_decay_value("two-stage", 59, total, warmup, peak) == peak
    assert weight_decay_value("two-stage", 60, total, warmup, peak) == 0.0
    for schedule in ("wsd", "cosine", "constant"):
        assert {weight_decay_value(schedule, t, total, warmup, peak) for t in range(total + 5)} == {peak}


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_lr_lambda_drives_torch_lambdalr_step_by_step(schedule: str) -> None:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=2.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, 40, 4, 0.25))
    for t in range(40):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * lr_multiplier(schedule, t, 40, 4, 0.25))
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("schedule", ["linear", "sigmoid"])
@pytest.mark.parametrize("warmup", [1, 2, 3, 8, 50])
def test_lambda_warmup_is_monotone_and_exactly_one_from_the_last_warmup_step(schedule: str, warmup: int) -> None:
    values = [quantization_strength(schedule, t, warmup) for t in range(warmup + 10)]
    assert all(b >= a for a, b in itertools.pairwise(values)), values
    assert all(v == 1.0 for v in values[warmup - 1 :]), "λ must be exactly 1.0 (the exact integer path)"
    assert all(0.0 <= v < 1.0 for v in values[: warmup - 1])
    if schedule == "linear":
        assert values == pytest.approx([min((t + 1) / warmup, 1.0) for t in range(warmup + 10)])


@pytest.mark.parametrize("warmup", [2, 5, 9, 40])
def test_sigmoid_lambda_starts_at_zero_and_is_symmetric_about_the_middle(warmup: int) -> None:
    values = [quantization_strength("sigmoid", t, warmup) for t in range(warmup)]
    assert values[0] == 0.0
    for t in range(warmup):
        assert values[t] + values[warmup - 1 - t] == pytest.approx(1.0, abs=1e-12)
    if warmup >= 5:  # an S-curve: slow at both ends, steep in the middle
        middle = warmup // 2
        assert values[middle] - values[middle - 1] > values[1] - values[0]


def test_lambda_none_is_always_one_and_zero_warmup_means_no_warmup() -> None:
    assert {quantization_strength("none", t, w) for t in range(20) for w in (0, 1, 10)} == {1.0}
    assert quantization_strength("linear", 0, 0) == 1.0
    assert quantization_strength("sigmoid", 0, 0) == 1.0


@pytest.mark.parametrize("step", [0, 3, 100])
def test_unknown_lambda_schedule_raises_at_every_step(step: int) -> None:
    with pytest.raises(ConfigError, match=r"'cosine'.*none, linear, sigmoid"):
        quantization_strength("cosine", step, 10)
    assert "cosine" not in LAMBDA_SCHEDULES


def test_unknown_learning_rate_schedule_raises() -> None:
    with pytest.raises(ConfigError, match="'linear'"):
        lr_lambda("linear", 100, 10, 0.2)
    with pytest.raises(ConfigError, match="'linear'"):
        lr_multiplier("linear", 50, 100, 10)
    with pytest.raises(ConfigError, match="'linear'"):
        lr_multiplier("linear", 2, 100, 10)  # during the warmup too
