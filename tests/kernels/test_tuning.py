"""Autotuning choices cached on disk: what bittern asks of Triton (CPU), and a second process reusing the first's
choice without timing anything (GPU)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton

from bittern.kernels import tuning

CONFIGS = [triton.Config({"B": 16}), triton.Config({"B": 32})]


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The keyword arguments of every ``triton.autotune`` call made through :func:`tuning.autotune`."""
    calls: list[dict] = []

    def fake_autotune(**kwargs):  # keyword-only, as tuning.autotune calls it
        calls.append(kwargs)
        return lambda fn: fn

    fake_autotune.__signature__ = inspect.signature(triton.autotune)  # type: ignore[attr-defined]
    monkeypatch.setattr(tuning.triton, "autotune", fake_autotune)
    return calls


def test_choices_are_cached_on_disk_by_default(recorded: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tuning.CACHE_ENV, raising=False)
    tuning.autotune(CONFIGS, key=["N"], prune_configs_by=None)
    assert recorded[-1].get("cache_results", False) is tuning.disk_cache_supported()
    assert recorded[-1]["key"] == ["N"] and recorded[-1]["configs"] == CONFIGS
    assert "prune_configs_by" in recorded[-1]


def test_env_keeps_choices_in_memory(recorded: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tuning.CACHE_ENV, "0")
    tuning.autotune(CONFIGS, key=["N"])
    assert "cache_results" not in recorded[-1]


def test_a_triton_without_disk_caching_is_not_asked_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []

    def old_autotune(configs, key, prune_configs_by=None):  # the signature of a Triton before 3.3
        calls.append({"configs": configs, "key": key})
        return lambda fn: fn

    monkeypatch.delenv(tuning.CACHE_ENV, raising=False)
    monkeypatch.setattr(tuning.triton, "autotune", old_autotune)
    assert not tuning.disk_cache_supported()
    tuning.autotune(CONFIGS, key=["K"])
    assert calls == [{"configs": CONFIGS, "key": ["K"]}]


_PRODUCT = """
import torch, sys
from triton.runtime import autotuner
from bittern.kernels import matmul
if sys.argv[1] == "second":  # timing a candidate now means the first process's choice was not reused
    def refuse(*args, **kwargs):
        raise SystemExit("autotuning ran again")
    autotuner.Autotuner._bench = refuse
g = torch.Generator(device="cuda").manual_seed(0)
xq = torch.randint(-127, 128, (200, 512), device="cuda", dtype=torch.int8, generator=g)
codes = torch.randint(-1, 2, (384, 512), device="cuda", dtype=torch.int8, generator=g)
y = matmul.int8_ternary_linear(xq, torch.ones(200, 1, device="cuda"), codes, torch.ones(1, device="cuda"), None,
                               torch.float32)
assert torch.equal(y, xq.float() @ codes.float().T)  # s_w = s_x = 1: the integer product itself
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not tuning.disk_cache_supported(), reason="this Triton keeps autotuning results per process")
def test_a_second_process_reuses_the_first_ones_choice(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "cache"), "BITTERN_AUTOTUNE": "1"}
    env.pop(tuning.CACHE_ENV, None)
    env.pop("TRITON_INTERPRET", None)
    script = textwrap.dedent(_PRODUCT)
    for run in ("first", "second"):
        done = subprocess.run([sys.executable, "-c", script, run], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (run, done.stderr[-2000:])
        if run == "first":
            assert list((tmp_path / "cache").rglob("_forward_kernel.autotune.json"))
