"""Exports of bittern models to other runtimes' formats (``bittern export``): GGUF for llama.cpp."""

from __future__ import annotations

from bittern.export.gguf import GGUFExport, RowFallbackWarning, export_gguf

__all__ = ["GGUFExport", "RowFallbackWarning", "export_gguf"]
