"""Bottleneck adapter (plain and routed) end to end on tiny BLIP (caption), LLaVA and the vision-prefix composite.

Same checks as ``test_routed_lora_families.py``; the trainable-parameter count equals the plain adapter's.
"""

from __future__ import annotations

import _routing_checks as checks
import pytest

from vlpeft import AdapterConfig
from vlpeft.testing import build_tiny_model

KINDS = [None, "mul", "add", "matmul", "matmul_expand"]
FAMILIES = ["blip_caption", "llava", "vit_roberta", "vit_gpt2"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return build_tiny_model(request.param, seed=4, num_hidden_layers=1)


@pytest.mark.parametrize("routing", KINDS)
def test_adapter_end_to_end(tiny, routing, tmp_path):
    pooling = "none" if routing == "matmul" else "mean"
    options = dict(style="houlsby", adapter_size=4, up_init="normal", init_std=0.2)
    config = AdapterConfig(routing=routing, pooling=pooling, **options)
    checks.run_all_checks(tiny, config, AdapterConfig(**options), tmp_path, generate=tiny.is_generative)
