"""What every layout shares: atomic output directories (their permissions) and the adapter-directory message."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import tiny_model

from bittern.checkpoint import load_model, save_model
from bittern.convert import to_bitlinear, to_ternary
from bittern.errors import ConfigError, MissingFileError
from bittern.formats.common import atomic_output_dir, read_config


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize(("mask", "directory", "file"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_outputs_get_the_permissions_the_umask_gives(tmp_path: Path, mask: int, directory: int, file: int) -> None:
    model = to_ternary(to_bitlinear(tiny_model("llama")))
    with umask(mask):
        for variant in ("packed", "bf16", "prequantized"):
            save_model(model, tmp_path / variant, variant)  # safetensors writes 0600 files; mkdtemp makes 0700
        with atomic_output_dir(tmp_path / "nested") as staging:
            (staging / "sub").mkdir()
            (staging / "sub" / "f.txt").write_text("x")
    for variant in ("packed", "bf16", "prequantized", "nested"):
        modes = _modes(tmp_path / variant)
        for name, mode in modes.items():
            expected = directory if (tmp_path / name).is_dir() else file
            assert mode == expected, (name, oct(mode))


def test_an_adapter_directory_given_as_a_model_is_named_as_one(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "runs/base/variants/packed"}))
    with pytest.raises(MissingFileError, match=r"is a LoRA adapter .*--adapter .*adapter \(its base: runs/base"):
        read_config(adapter)
    with pytest.raises(MissingFileError, match="is a file, not a checkpoint directory"):
        read_config(adapter / "adapter_config.json")


def test_saving_never_replaces_the_directory_the_model_was_read_from(tmp_path: Path) -> None:
    model = to_ternary(tiny_model("llama", seed=0))
    source = save_model(model, tmp_path / "variants" / "packed", "packed")
    (tmp_path / "variants" / "bf16").mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    loaded = load_model(source)
    for destination in (tmp_path / "variants", tmp_path):
        with pytest.raises(ConfigError, match="holds the source"):
            save_model(loaded, destination, "packed", overwrite=True)
    with pytest.raises(ConfigError, match="holds the source"):  # the tokenizer's directory counts too
        save_model(model, tmp_path / "variants", "bf16", tokenizer_source=source, overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    save_model(loaded, tmp_path / "variants" / "bf16", "bf16", overwrite=True)  # beside it is fine
    save_model(loaded, source, "bf16", overwrite=True)  # and so is in place (test_roundtrip checks the result)
