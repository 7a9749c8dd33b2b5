"""bittern: ternary (BitNet b1.58) language models with the Hugging Face stack.

Layers (docs/design.md §1): :mod:`bittern.quant` (the math) → :mod:`bittern.nn` (BitLinear, TernaryLinear) →
:mod:`bittern.convert` (model surgery) and :mod:`bittern.formats` (checkpoint layouts) →
:mod:`bittern.checkpoint` (load / save / convert models) → use-cases such as :mod:`bittern.engine` (generation:
``bittern.load(path).generate(...)``) → :mod:`bittern.cli`.

The names below are imported on first use (PEP 562), so ``import bittern`` (and ``bittern --help``) does not
import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bittern.lazy import lazy_attributes

__version__ = "0.1.0"

_EXPORTS = {
    "BitLinear": "bittern.nn",
    "ConversionPolicy": "bittern.convert",
    "Engine": "bittern.engine",
    "TernaryLinear": "bittern.nn",
    "convert_checkpoint": "bittern.checkpoint",
    "load": "bittern.engine",
    "load_model": "bittern.checkpoint",
    "save_model": "bittern.checkpoint",
    "to_bitlinear": "bittern.convert",
    "to_linear": "bittern.convert",
    "to_ternary": "bittern.convert",
}

__all__ = [
    "BitLinear",
    "ConversionPolicy",
    "Engine",
    "TernaryLinear",
    "__version__",
    "convert_checkpoint",
    "load",
    "load_model",
    "save_model",
    "to_bitlinear",
    "to_linear",
    "to_ternary",
]

if TYPE_CHECKING:
    from bittern.checkpoint import convert_checkpoint, load_model, save_model
    from bittern.convert import ConversionPolicy, to_bitlinear, to_linear, to_ternary
    from bittern.engine import Engine, load
    from bittern.nn import BitLinear, TernaryLinear


__getattr__, __dir__ = lazy_attributes("bittern", _EXPORTS, globals())
