"""The error hierarchy of bittern.

Every error a user can cause with bad input derives from :class:`BitternError`, carries one message that
names what is wrong (the file, the tensor, the module or the argument), and is printed by the CLI as a
single line without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class BitternError(Exception):
    """Base class of every error bittern raises on purpose."""


class ConfigError(BitternError, ValueError):
    """A bad argument, option or configuration value."""


class UnsupportedModuleError(BitternError, TypeError):
    """A module that bittern cannot convert (for example GPT-2's ``Conv1D``)."""

    def __init__(self, module_name: str, module_type: str, hint: str = "") -> None:
        self.module_name = module_name
        self.module_type = module_type
        message = (
            f"module '{module_name}' is a {module_type}, which bittern cannot convert: "
            "only torch.nn.Linear layers are turned into ternary layers"
        )
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class CheckpointError(BitternError):
    """A problem with a checkpoint on disk; names the file and, where known, the tensor."""

    def __init__(self, message: str, path: str | Path | None = None, tensor: str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.tensor = tensor
        where = []
        if path is not None:
            where.append(f"file '{path}'")
        if tensor is not None:
            where.append(f"tensor '{tensor}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class MissingFileError(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs does not exist."""


class CorruptCheckpointError(CheckpointError):
    """A file exists but cannot be parsed: truncated, corrupt header, wrong dtype, invalid packed codes."""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape does not fit the model the config describes."""


class NonFiniteWeightError(CheckpointError):
    """A weight or scale holds NaN or Inf."""


class UnknownFormatError(CheckpointError):
    """The checkpoint's layout or quantization method is not one bittern reads."""


class OutputExistsError(BitternError, FileExistsError):
    """The destination exists and ``overwrite`` was not asked for."""
