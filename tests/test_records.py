"""bittern.records: the one JSONL reader (training data and evaluation text read through it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bittern.errors import ConfigError
from bittern.records import jsonl_records


def test_records_skip_blank_lines_and_say_where_they_are(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n   \n[1, 2]\n"plain"\n', encoding="utf-8")
    assert list(jsonl_records(path)) == [
        (f"{path}: line 1", {"text": "a"}),
        (f"{path}: line 4", [1, 2]),
        (f"{path}: line 5", "plain"),
    ]


def test_bad_json_and_bad_encoding_name_the_file_and_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.jsonl: line 2 is not valid JSON"):
        list(jsonl_records(broken))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=r"latin\.jsonl.*not UTF-8"):
        list(jsonl_records(latin))
