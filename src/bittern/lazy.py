"""Lazy package attributes: a package's public names are imported from their modules on first access, so that
``import bittern`` (and ``bittern --help``) does not import torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: a name in ``exports`` (name → defining module) is imported from
    that module, any other name as the submodule ``package.name`` (as an eager ``__init__`` would have loaded it);
    the value is kept in ``namespace`` (the package's globals). An unknown name raises ``AttributeError``."""

    def getattr_(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        else:
            value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *exports})

    return getattr_, dir_
