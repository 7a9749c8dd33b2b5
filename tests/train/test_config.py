"""``bittern train``'s options come from TrainConfig's fields: one default, one help text, one parser."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from bittern.train.config import TrainConfig, add_train_options


def _parse(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_train_options(parser)
    return TrainConfig.from_options(parser.parse_args(list(argv)))


def test_no_options_give_the_dataclass_defaults() -> None:
    assert _parse("--out", "run") == TrainConfig(out="run")


def test_every_field_has_one_option_with_help() -> None:
    parser = argparse.ArgumentParser()
    add_train_options(parser)
    dests = {action.dest: action for action in parser._actions if action.dest != "help"}
    assert set(dests) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(action.help for action in dests.values())
    assert "(default 1000)" in parser.format_help()  # %(default)s filled from the dataclass


def test_flags_lists_and_values_parse_into_the_config() -> None:
    argv = ["--out", "run", "--model", "m", "--data", "a.txt", "--data", "b", "--steps", "20", "--lr", "2e-4"]
    config = _parse(*argv, "--lora-rank", "4", "--lora-targets", "q_proj, v_proj", "--no-export", "--quiet", "--fsdp")
    assert config.data == ["a.txt", "b"] and config.steps == 20 and config.lr == 2e-4
    assert config.lora_rank == 4 and config.lora_targets == ["q_proj", "v_proj"]
    assert (config.export, config.progress, config.fsdp) == (False, False, True)
    assert _parse("--out", "other").data == []  # a fresh list per parse


def test_bad_values_are_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse("--out", "run", "--schedule", "linear-ish")
    assert "--schedule" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse("--preset", "tiny")  # --out is required
