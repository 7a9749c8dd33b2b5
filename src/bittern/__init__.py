"""bittern: ternary (BitNet b1.58) language models with the Hugging Face stack.

Layers (docs/design.md §1): :mod:`bittern.quant` (the math) → :mod:`bittern.nn` (BitLinear, TernaryLinear) →
:mod:`bittern.convert` (model surgery) and :mod:`bittern.formats` (checkpoint layouts) →
:mod:`bittern.checkpoint` (load / save / convert models) → use-cases such as :mod:`bittern.engine` (generation:
``bittern.load(path).generate(...)``) → :mod:`bittern.cli`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from bittern.checkpoint import convert_checkpoint, load_model, save_model
from bittern.convert import ConversionPolicy, to_bitlinear, to_linear, to_ternary
from bittern.engine import Engine, load
from bittern.nn import BitLinear, TernaryLinear

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
