"""The embedded default corpus: English text that ships with every Python installation.

Two sources, both read from the running interpreter's standard library, so nothing is downloaded:

* ``pydoc_data.topics``: the language reference topics behind ``help()`` (~0.47 MB, 79 documents);
* the docstrings of the standard library's pure-Python modules, read with :mod:`ast` without importing them
  (~1.5 MB, one document per module; tests, IDLE, lib2to3 and tkinter are skipped).

The text differs slightly between Python versions; within one interpreter it is deterministic.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path

_SKIPPED_PARTS = {"idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip", "turtledemo", "tkinter"}


def pydoc_topics() -> list[str]:
    """The ``help()`` topics of this interpreter, one document each, sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics) if topics[name].strip()]


def _module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                docs.append(doc.strip())
    return "\n\n".join(docs)


def stdlib_docstrings(limit_modules: int | None = None) -> list[str]:
    """The docstrings of the standard library's ``.py`` files, one document per file, sorted by path.

    Args:
        limit_modules: read at most this many files (for quick tests); None reads all (~560 files).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for directory, subdirectories, files in os.walk(root):
        # prune skipped trees (site-packages can be large) instead of walking and discarding them
        subdirectories[:] = [
            d for d in subdirectories if d not in _SKIPPED_PARTS and not d.startswith("test") and d != "__pycache__"
        ]
        paths += [Path(directory) / f for f in files if f.endswith(".py") and not f.startswith("test")]
    documents = []
    for path in sorted(paths):
        text = _module_docstrings(path)
        if text:
            documents.append(text)
            if limit_modules is not None and len(documents) >= limit_modules:
                break
    return documents


def default_corpus(docstrings: bool = True, limit_modules: int | None = None) -> list[str]:
    """The embedded corpus as a list of documents: the ``help()`` topics, then (optionally) stdlib docstrings."""
    documents = pydoc_topics()
    if docstrings:
        documents += stdlib_docstrings(limit_modules)
    return documents
