"""JSON Lines files, read one way for every use-case (training data, evaluation text): each non-blank line one
JSON value, every error naming the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bittern.errors import ConfigError


def jsonl_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for each non-blank line of a UTF-8 JSONL file: ``where`` is ``"FILE: line N"`` (for the
    caller's own errors about the record), ``record`` the parsed value.

    Raises:
        ConfigError: a line that is not valid JSON, or a file that is not UTF-8 (named with the file and line).
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}: line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{where} is not valid JSON ({error.msg})") from None
                yield where, record
    except UnicodeDecodeError as error:
        raise ConfigError(f"data file '{path}' is not UTF-8 text ({error})") from None
