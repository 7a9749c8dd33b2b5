"""``bittern demo``'s pieces: a model shape whose GGUF export is ternary throughout, and the sample printed as
text. The demo end to end runs in test_cli.py (slow)."""

from __future__ import annotations

import pytest
import torch

from bittern.demo import demo_config, format_sample
from bittern.train.presets import get_preset


def test_the_demo_models_rows_all_fit_the_ternary_gguf_blocks(tmp_path) -> None:
    """Every ternary layer's input dimension K is a multiple of 256, so ``bittern export gguf`` stores each one as
    TQ2_0 (2.06 bits per weight) and none falls back to Q8_0."""
    pytest.importorskip("gguf")
    from bittern.export.gguf import stored_type
    from bittern.formats.gguf import TERNARY_BLOCK

    config = demo_config(tmp_path)
    preset = get_preset(config.preset)
    assert preset.hidden_size % TERNARY_BLOCK == 0 and preset.intermediate_size % TERNARY_BLOCK == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(preset.config(4096), dtype=torch.float32)
    rows = {name: m.in_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    rows.pop("lm_head")
    assert {stored_type("tq2_0", k) for k in rows.values()} == {"tq2_0"}


def test_the_sample_is_printed_as_text() -> None:
    sample = 'The import statement "x".\n\n  if a:\n\tb = 1'
    assert format_sample(sample) == '  The import statement "x".\n\n    if a:\n  \tb = 1'
    assert "\\n" not in format_sample(sample) and not format_sample(sample).strip().startswith("'")
