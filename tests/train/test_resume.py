"""A run killed with SIGKILL and started again with the same command resumes, and its losses match an
uninterrupted run's step for step."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_train_args

STEPS = 24


def _command(out: Path, data: Path) -> list[str]:
    args = tiny_train_args(out, data, batch_size=4, steps=STEPS, save_every=3, eval_every=6)
    return [sys.executable, "-m", "bittern.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*"))


@pytest.mark.slow
def test_sigkill_then_same_command_resumes_with_identical_losses(text_dir: Path, tmp_path: Path) -> None:
    reference = tmp_path / "uninterrupted"
    subprocess.run(_command(reference, text_dir), check=True, env=_env(), capture_output=True)
    expected = _losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _command(killed, text_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if (killed / "checkpoints").is_dir() and any(s >= 6 for s in _checkpoint_steps(killed)):
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped_at = max(_checkpoint_steps(killed))
    assert stopped_at < STEPS

    resumed = subprocess.run(_command(killed, text_dir), check=True, env=_env(), capture_output=True, text=True)
    losses = _losses(killed)
    assert sorted(losses) == list(range(1, STEPS + 1)), "metrics.jsonl must describe one run, without repeats"
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}"
    events = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    events = [(r["event"], r["step"]) for r in events if "event" in r]
    assert events == [("start", 0), ("resume", stopped_at)], "the second process must continue, not restart"
    assert not (killed / "checkpoints" / ".staging").exists()
    assert (killed / "report.md").exists() and (killed / "curves.png").exists()
    assert "resuming" not in resumed.stdout  # --quiet


def test_a_different_command_on_the_same_run_directory_is_refused(
    text_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bittern.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"out": str(run), "preset": "small", "steps": 5}))
    code = main(_command(run, text_dir)[3:])
    assert code == 2
    error = capsys.readouterr().err
    assert "different settings" in error and "preset: 'small' → 'tiny'" in error and f"steps: 5 → {STEPS}" in error
    assert sorted(p.name for p in run.iterdir()) == ["run_config.json"]  # nothing written


def _states(run: Path) -> dict[str, str]:
    return {p.name: (p / "trainer_state.json").read_text() for p in sorted((run / "checkpoints").glob("checkpoint-*"))}


def test_a_finished_run_is_final_and_a_rerun_only_re_exports(
    text_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bittern.cli import main

    run = tmp_path / "run"
    args = [a for a in tiny_train_args(run, text_dir, batch_size=4, steps=4, save_every=2) if a != "--no-export"]
    assert main(args) == 0
    states, metrics = _states(run), (run / "metrics.jsonl").read_text()
    files = {v: (run / "variants" / v / "model.safetensors").read_bytes() for v in ("packed", "bf16", "prequantized")}
    configs = {v: (run / "variants" / v / "config.json").read_text() for v in ("packed", "bf16", "prequantized")}
    report = (run / "report.md").read_text()
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "run already finished at step 4: re-exporting and re-evaluating (no training)" in out
    assert _checkpoint_steps(run) == [2, 4] and _states(run) == states  # no step 5, nothing rotated away
    assert (run / "metrics.jsonl").read_text() == metrics
    for variant in ("packed", "bf16", "prequantized"):  # the same trained weights, the same files
        assert (run / "variants" / variant / "model.safetensors").read_bytes() == files[variant], variant
        assert (run / "variants" / variant / "config.json").read_text() == configs[variant], variant
    table = re.compile(r"^\| (packed|bf16|prequantized) .*$", re.MULTILINE)
    assert table.findall((run / "report.md").read_text()) == table.findall(report)
    assert table.findall(report) == ["packed", "bf16", "prequantized"]


def test_the_reports_mean_objective_covers_every_step_after_a_resume(text_dir: Path, tmp_path: Path) -> None:
    """Logged every 4 steps, checkpointed every 3, interrupted after the checkpoint of step 3: report.md's mean
    training objective is still the mean over steps 1-6 (an uninterrupted run logging every step gives it)."""
    from bittern.cli import main

    def args(run: Path, log_every: int) -> list[str]:
        argv = tiny_train_args(run, text_dir, batch_size=4, steps=6, save_every=3)
        argv[argv.index("--log-every") + 1] = str(log_every)
        return argv

    assert main(args(tmp_path / "reference", 1)) == 0
    per_step = _losses(tmp_path / "reference")
    assert sorted(per_step) == [1, 2, 3, 4, 5, 6]
    run = tmp_path / "run"
    assert main(args(run, 4)) == 0
    shutil.rmtree(run / "checkpoints" / "checkpoint-6")  # as if killed after the checkpoint of step 3
    assert main(args(run, 4)) == 0  # resumes from step 3 and trains steps 4-6
    assert sorted(_losses(run)) == [3, 4, 6]  # checkpoint steps are logged too: the records cover every step
    reported = re.search(r"mean training objective over the run [^:]*: ([0-9.]+)", (run / "report.md").read_text())
    assert reported is not None
    assert float(reported.group(1)) == pytest.approx(sum(per_step.values()) / 6, abs=2e-4)
