"""Routed LoRA end to end on tiny BLIP (caption), LLaVA and the vision-prefix composite (encoder and decoder).

For every routing kind (and ``None``): trainable-parameter count equal to plain LoRA, forward/backward with
gradients only on adapter parameters, equal gradients under gradient checkpointing, batch == single-sample
outputs, beam generation of a batch of two images == each image alone (generative models), save/load
equality, disable/unload give the base model.
"""

from __future__ import annotations

import _routing_checks as checks
import pytest

from vlpeft import RoutedLoraConfig
from vlpeft.testing import build_tiny_model

KINDS = [None, "mul", "add", "matmul", "matmul_expand"]
FAMILIES = ["blip_caption", "llava", "vit_roberta", "vit_gpt2"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return build_tiny_model(request.param, seed=3, num_hidden_layers=1)


@pytest.mark.parametrize("routing", KINDS)
def test_routed_lora_end_to_end(tiny, routing, tmp_path):
    pooling = "none" if routing == "matmul" else "mean"
    config = RoutedLoraConfig(r=4, lora_alpha=8, routing=routing, pooling=pooling, init_lora_weights=False)
    plain = RoutedLoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    checks.run_all_checks(tiny, config, plain, tmp_path, generate=tiny.is_generative)
