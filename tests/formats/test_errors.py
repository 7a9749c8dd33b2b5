"""Bad checkpoints give one clear error naming the file (and tensor); writers never leave half-written output."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import bittern.formats.common
from bittern.checkpoint import load_model, save_model
from bittern.convert import to_bitlinear, to_ternary
from bittern.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    MissingFileError,
    NonFiniteWeightError,
    OutputExistsError,
    ShapeMismatchError,
    UnknownFormatError,
)
from bittern.formats import read_checkpoint

Q_PROJ = "model.layers.0.self_attn.q_proj"
NORM = "model.layers.0.input_layernorm.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Valid checkpoints of one tiny llama in every variant (copied, never modified, by the tests)."""
    root = tmp_path_factory.mktemp("pristine")
    bit = to_bitlinear(tiny_model("llama")).eval()
    save_model(bit, root / "prequantized", variant="prequantized")
    tiny_model("llama").save_pretrained(root / "full")
    ternary = to_ternary(bit)
    save_model(ternary, root / "packed", variant="packed")
    save_model(ternary, root / "bf16", variant="bf16")
    return {p.name: p for p in root.iterdir()}


@pytest.fixture
def checkpoint_copy(tmp_path: Path, pristine: dict[str, Path]) -> Callable[[str], Path]:
    """``copy(variant)`` → a private copy of a valid checkpoint to corrupt."""

    def copy(variant: str) -> Path:
        destination = tmp_path / variant
        shutil.copytree(pristine[variant], destination)
        return destination

    return copy


def edit_tensors(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Load ``model.safetensors``, let ``edit`` change the dict in place, write it back."""
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


def edit_config(directory: Path, edit: Callable[[dict], None]) -> Path:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return path


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_names(error: CheckpointError, path: Path, tensor: str | None = None) -> None:
    """The error carries and prints the file (and tensor)."""
    assert error.path == path
    assert str(path) in str(error)
    if tensor is not None:
        assert error.tensor == tensor
        assert f"'{tensor}'" in str(error)


# --- missing and unreadable files -------------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError) as excinfo:
        read_checkpoint(tmp_path / "nowhere")
    assert_names(excinfo.value, tmp_path / "nowhere")
    with pytest.raises(MissingFileError):
        load_model(tmp_path / "nowhere")


def test_missing_config(checkpoint_copy: Callable[[str], Path]) -> None:
    directory = checkpoint_copy("packed")
    (directory / "config.json").unlink()
    with pytest.raises(MissingFileError) as excinfo:
        read_checkpoint(directory)
    assert_names(excinfo.value, directory / "config.json")


@pytest.mark.parametrize("content", ["{not json", "[1, 2, 3]", "\udcff"], ids=["syntax", "not-object", "not-utf8"])
def test_config_not_json(checkpoint_copy: Callable[[str], Path], content: str) -> None:
    directory = checkpoint_copy("packed")
    (directory / "config.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(CorruptCheckpointError) as excinfo:
        read_checkpoint(directory)
    assert_names(excinfo.value, directory / "config.json")


class _Tripwire:
    """Unpickling this touches a file: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def test_only_pickle_weights(tmp_path: Path, pristine: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory with only pytorch_model.bin is refused without ever unpickling it."""
    directory = tmp_path / "legacy"
    directory.mkdir()
    shutil.copy(pristine["full"] / "config.json", directory / "config.json")
    sentinel = tmp_path / "pickle-was-loaded"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps({"model.norm.weight": _Tripwire(sentinel)}))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("bittern tried to load a pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    with pytest.raises(UnknownFormatError) as excinfo:
        read_checkpoint(directory)
    message = str(excinfo.value)
    assert "pickle" in message and "pytorch_model.bin" in message
    assert excinfo.value.path == directory
    with pytest.raises(UnknownFormatError):
        load_model(directory)
    assert not sentinel.exists()


def test_no_weights_at_all(checkpoint_copy: Callable[[str], Path]) -> None:
    directory = checkpoint_copy("packed")
    (directory / "model.safetensors").unlink()
    with pytest.raises(MissingFileError) as excinfo:
        read_checkpoint(directory)
    assert_names(excinfo.value, directory)


@pytest.mark.parametrize("variant", ["packed", "bf16", "full"])
def test_truncated_safetensors(checkpoint_copy: Callable[[str], Path], variant: str) -> None:
    directory = checkpoint_copy(variant)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError) as excinfo:
        read_checkpoint(directory)
    assert_names(excinfo.value, path)


@pytest.mark.parametrize("garbage", ["json", "length"])
def test_garbage_header(checkpoint_copy: Callable[[str], Path], garbage: str) -> None:
    """A header that is not JSON, or a header length past the end of the file."""
    directory = checkpoint_copy("packed")
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    if garbage == "json":
        data[8 : 8 + header_len] = b"\x00garbage!" * (header_len // 9) + b"!" * (header_len % 9)
    else:
        data[:8] = (len(data) * 4).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as excinfo:
        read_checkpoint(directory)
    assert_names(excinfo.value, path)


# --- packed tensors -----------------------------------------------------------------------------------------


def test_packed_code_three(checkpoint_copy: Callable[[str], Path]) -> None:
    """A 2-bit slot holding 3 (no ternary code) is refused, naming the tensor."""
    directory = checkpoint_copy("packed")

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        packed = tensors[f"{Q_PROJ}.weight"]
        packed[3, 5] = packed[3, 5] | 0b1100_0000  # slot of row 3 + 3R becomes 3

    path = edit_tensors(directory, poison)
    with pytest.raises(CorruptCheckpointError) as excinfo:
        read_checkpoint(directory)
    assert_names(excinfo.value, path, f"{Q_PROJ}.weight")
    assert "3" in str(excinfo.value)


def test_missing_weight_scale(checkpoint_copy: Callable[[str], Path]) -> None:
    directory = checkpoint_copy("packed")
    path = edit_tensors(directory, lambda t: t.pop(f"{Q_PROJ}.weight_scale"))
    with pytest.raises(CorruptCheckpointError) as excinfo:
        read_checkpoint(directory)
    assert_names(excinfo.value, path, f"{Q_PROJ}.weight")
    assert "weight_scale" in str(excinfo.value)


def test_weight_scale_wrong_shape(checkpoint_copy: Callable[[str], Path]) -> None:
    directory = checkpoint_copy("packed")
    path = edit_tensors(directory, lambda t: t.update({f"{Q_PROJ}.weight_scale": torch.ones(2)}))
    with pytest.raises(ShapeMismatchError) as excinfo:
        read_checkpoint(directory)
    assert_names(excinfo.value, path, f"{Q_PROJ}.weight_scale")


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_weight_scale_not_positive(checkpoint_copy: Callable[[str], Path], value: float) -> None:
    directory = checkpoint_copy("packed")
    path = edit_tensors(directory, lambda t: t.update({f"{Q_PROJ}.weight_scale": torch.tensor([value])}))
    with pytest.raises(CorruptCheckpointError) as excinfo:
        read_checkpoint(directory)
    assert_names(excinfo.value, path, f"{Q_PROJ}.weight_scale")


def test_unknown_linear_class(checkpoint_copy: Callable[[str], Path]) -> None:
    directory = checkpoint_copy("packed")
    path = edit_config(directory, lambda c: c["quantization_config"].update(linear_class="fancylinear"))
    with pytest.raises(UnknownFormatError) as excinfo:
        read_checkpoint(directory)
    assert_names(excinfo.value, path)
    assert "fancylinear" in str(excinfo.value)


# --- shapes ------------------------------------------------------------------------------------------------


def test_dense_shape_mismatch(checkpoint_copy: Callable[[str], Path]) -> None:
    """A dense tensor that does not fit the model config.json describes."""
    directory = checkpoint_copy("packed")
    path = edit_tensors(directory, lambda t: t.update({NORM: torch.ones(63)}))
    with pytest.raises(ShapeMismatchError) as excinfo:
        load_model(directory)
    assert_names(excinfo.value, path, NORM)
    assert "63" in str(excinfo.value) and "64" in str(excinfo.value)


def test_config_shape_mismatch(checkpoint_copy: Callable[[str], Path]) -> None:
    """config.json describes a different model than the tensors hold (hidden 64 on disk, 96 in the config)."""
    directory = checkpoint_copy("bf16")
    edit_config(directory, lambda c: c.update(intermediate_size=96))
    with pytest.raises(ShapeMismatchError) as excinfo:
        load_model(directory)
    assert excinfo.value.path == directory / "model.safetensors"
    assert excinfo.value.tensor is not None and "mlp" in excinfo.value.tensor
    assert excinfo.value.tensor in str(excinfo.value)


def test_packed_rows_mismatch(checkpoint_copy: Callable[[str], Path]) -> None:
    """Packed rows that do not match the layer config.json describes."""
    directory = checkpoint_copy("packed")
    path = edit_tensors(directory, lambda t: t.update({f"{Q_PROJ}.weight": t[f"{Q_PROJ}.weight"][:8].clone()}))
    with pytest.raises(ShapeMismatchError) as excinfo:
        load_model(directory)
    assert_names(excinfo.value, path, f"{Q_PROJ}.weight")


def test_packed_weight_not_2d(checkpoint_copy: Callable[[str], Path]) -> None:
    directory = checkpoint_copy("packed")
    path = edit_tensors(directory, lambda t: t.update({f"{Q_PROJ}.weight": t[f"{Q_PROJ}.weight"].reshape(-1)}))
    with pytest.raises(ShapeMismatchError) as excinfo:
        read_checkpoint(directory)
    assert_names(excinfo.value, path, f"{Q_PROJ}.weight")


# --- non-finite values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "key", "value"),
    [
        ("packed", NORM, float("nan")),
        ("packed", "lm_head.weight", float("inf")),
        ("packed", f"{Q_PROJ}.weight_scale", float("inf")),
        ("packed", f"{Q_PROJ}.weight_scale", float("nan")),
        ("bf16", f"{Q_PROJ}.weight", float("nan")),
        ("bf16", "model.embed_tokens.weight", float("-inf")),
        ("prequantized", f"{Q_PROJ}.weight", float("nan")),
        ("full", "model.norm.weight", float("inf")),
    ],
)
def test_non_finite(checkpoint_copy: Callable[[str], Path], variant: str, key: str, value: float) -> None:
    directory = checkpoint_copy(variant)

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key].reshape(-1)[0] = value

    path = edit_tensors(directory, poison)
    with pytest.raises(NonFiniteWeightError) as excinfo:
        read_checkpoint(directory)
    assert_names(excinfo.value, path, key)


# --- unknown formats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gptq", "awq", None])
def test_unknown_quant_method(checkpoint_copy: Callable[[str], Path], method: str | None) -> None:
    directory = checkpoint_copy("full")
    path = edit_config(directory, lambda c: c.update(quantization_config={"quant_method": method, "bits": 4}))
    with pytest.raises(UnknownFormatError) as excinfo:
        read_checkpoint(directory)
    assert_names(excinfo.value, path)
    assert repr(method) in str(excinfo.value)


@pytest.mark.parametrize("marker", [{"format": "int4", "version": 1}, {"version": 1}, "packed"])
def test_unknown_bittern_marker(checkpoint_copy: Callable[[str], Path], marker: object) -> None:
    directory = checkpoint_copy("packed")
    path = edit_config(directory, lambda c: c.update(bittern=marker))
    with pytest.raises(UnknownFormatError) as excinfo:
        read_checkpoint(directory)
    assert_names(excinfo.value, path)
    assert "unknown bittern format" in str(excinfo.value)


def test_unknown_model_type(checkpoint_copy: Callable[[str], Path]) -> None:
    directory = checkpoint_copy("packed")
    edit_config(directory, lambda c: c.update(model_type="no-such-model"))
    with pytest.raises(UnknownFormatError) as excinfo:
        load_model(directory)
    assert "no-such-model" in str(excinfo.value)


# --- output safety -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ternary() -> torch.nn.Module:
    return to_ternary(to_bitlinear(tiny_model("llama"))).eval()


def test_existing_destination_refused(tmp_path: Path, small_ternary: torch.nn.Module) -> None:
    """Without overwrite an existing destination is left byte-identical, and nothing is left beside it."""
    destination = tmp_path / "out"
    save_model(small_ternary, destination, variant="bf16")
    (destination / "notes.txt").write_text("mine")
    before = snapshot(destination)
    for variant in ("packed", "bf16", "prequantized"):
        model = to_bitlinear(tiny_model("llama")) if variant == "prequantized" else small_ternary
        with pytest.raises(OutputExistsError) as excinfo:
            save_model(model, destination, variant=variant)
        assert str(destination) in str(excinfo.value)
    assert snapshot(destination) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_file_destination_refused(tmp_path: Path, small_ternary: torch.nn.Module) -> None:
    destination = tmp_path / "out"
    destination.write_text("a file, not a checkpoint")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError):
            save_model(small_ternary, destination, variant="packed", overwrite=overwrite)
    assert destination.read_text() == "a file, not a checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_replaces(tmp_path: Path, small_ternary: torch.nn.Module) -> None:
    """overwrite=True replaces the whole directory (stale files included) and leaves no temp dirs."""
    destination = tmp_path / "out"
    save_model(small_ternary, destination, variant="bf16")
    (destination / "notes.txt").write_text("stale")
    save_model(small_ternary, destination, variant="packed", overwrite=True)
    assert json.loads((destination / "config.json").read_text())["bittern"]["format"] == "packed"
    assert not (destination / "notes.txt").exists()
    assert sorted(p.name for p in destination.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(destination / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor(f"{Q_PROJ}.weight").dtype == torch.uint8
    assert read_checkpoint(destination).layout == "bittern-packed"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _variant_model(variant: str, small_ternary: torch.nn.Module) -> torch.nn.Module:
    return to_bitlinear(tiny_model("llama")) if variant == "prequantized" else small_ternary


def _failing_write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write part of a file, then fail like a full disk."""
    path.write_bytes(b"partial" * 100)
    raise OSError(28, "No space left on device")


def _failing_write_config(directory: Path, config: dict) -> None:
    (directory / "config.json").write_text("{")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("variant", ["packed", "bf16", "prequantized"])
@pytest.mark.parametrize("stage", ["weights", "config"])
def test_failure_while_writing_leaves_nothing(
    tmp_path: Path, small_ternary: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, variant: str, stage: str
) -> None:
    """A write that fails midway leaves neither the destination nor a temp dir beside it."""
    if stage == "weights":
        monkeypatch.setattr(bittern.formats.common, "write_safetensors", _failing_write_safetensors)
    else:
        monkeypatch.setattr(bittern.formats.common, "write_config", _failing_write_config)
    destination = tmp_path / "parent" / "out"
    with pytest.raises(OSError, match="No space left"):
        save_model(_variant_model(variant, small_ternary), destination, variant=variant)
    assert not destination.exists()
    assert list((tmp_path / "parent").iterdir()) == []


@pytest.mark.parametrize("variant", ["packed", "bf16", "prequantized"])
def test_failed_overwrite_keeps_old(
    tmp_path: Path, small_ternary: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    """overwrite=True that fails midway leaves the old destination byte-identical and no temp dir."""
    destination = tmp_path / "out"
    save_model(small_ternary, destination, variant="packed")
    before = snapshot(destination)
    monkeypatch.setattr(bittern.formats.common, "write_config", _failing_write_config)
    with pytest.raises(OSError, match="No space left"):
        save_model(_variant_model(variant, small_ternary), destination, variant=variant, overwrite=True)
    assert snapshot(destination) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_writer_validation_happens_before_any_output(tmp_path: Path, small_ternary: torch.nn.Module) -> None:
    """Refusals (bad variant, bad convention) create nothing."""
    destination = tmp_path / "parent" / "out"
    destination.parent.mkdir()
    with pytest.raises(ConfigError):
        save_model(small_ternary, destination, variant="gguf-ish")
    with pytest.raises(ConfigError):
        save_model(small_ternary, destination, variant="packed", scale_convention="sideways")
    assert list(destination.parent.iterdir()) == []


def test_a_gguf_named_file_without_the_magic_bytes_is_named_as_not_gguf(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bittern.cli import main

    fake = tmp_path / "fake.gguf"
    fake.write_text("hello, this is text\n", encoding="utf-8")
    message = f"file '{fake}': not a GGUF file: it does not start with the magic bytes 'GGUF' (20 bytes)"
    with pytest.raises(CorruptCheckpointError) as excinfo:
        read_checkpoint(fake)
    assert str(excinfo.value) == message
    assert main(["inspect", str(fake)]) == 2
    assert capsys.readouterr().err == f"bittern: error: {message}\n"
    other = tmp_path / "notes.txt"  # any other file is still no checkpoint directory
    other.write_text("hello\n", encoding="utf-8")
    with pytest.raises(MissingFileError, match="is a file, not a checkpoint directory"):
        read_checkpoint(other)
