"""p-adapter at initialisation (issue #17, docs/instabilities.md).

``release`` with ``init_weights="zero_up"`` starts exactly as the base model. ``paper`` cannot start as the identity
(Ū replaces the attention output; p-adapter.md §2.6), but with its default mu it must keep the image visible at
init. The former default, mu0 = 10 on SNLI-VE (the release's constant reused for ``paper``, mu = 20), made Ū the
query's own projection V̂_q and cut the image off (measured on the demo base: SNLI-VE predictions constant, 31.67 %).
"""

from __future__ import annotations

import peft
import pytest
import torch
from _training_data import write_snli_ve_data

from vlpeft.testing import build_tiny_model
from vlpeft.training import config_from_dict, validate_config
from vlpeft.tuners.p_adapter import TASK_DEFAULTS, PAdapterConfig
from vlpeft.tuners.p_adapter.config import PAPER_MU0


@pytest.fixture(scope="module")
def snli_ve_data(tmp_path_factory):
    return write_snli_ve_data(tmp_path_factory.mktemp("ve"), 2, 2)


def _training_method_config(data, tmp_path, **options) -> PAdapterConfig:
    """The PAdapterConfig the training layer builds for an SNLI-VE run (task defaults merged under ``options``)."""
    config = config_from_dict({
        "model": {"tiny": "blip_caption"},
        "method": {"type": "p_adapter", "key_pool_size": 8, **options},  # the tiny BLIP has 17 image tokens
        "task": {"type": "snli_ve", "train": data["train"], "images": data["images"]},
        "eval": {"strategy": "no", "load_best_at_end": False},
        "run": {"output_dir": str(tmp_path / "run")},
    })
    return validate_config(config).method_config


def _adapted(config: PAdapterConfig):
    torch.manual_seed(0)
    tiny = build_tiny_model("blip_caption", seed=0)
    return peft.get_peft_model(tiny.model.eval(), config), tiny.inputs


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _image_sensitivity(config: PAdapterConfig) -> float:
    """How much the logits move when the image changes, adapted model over base model (adapters disabled)."""
    model, inputs = _adapted(config)
    torch.manual_seed(1)
    other = {**inputs, "pixel_values": torch.randn_like(inputs["pixel_values"])}
    adapted = (_logits(model, inputs) - _logits(model, other)).abs().mean()
    with model.disable_adapter():
        base = (_logits(model, inputs) - _logits(model, other)).abs().mean()
    return float(adapted / base)


def test_mu_defaults_follow_the_variant(snli_ve_data, tmp_path):
    paper = _training_method_config(snli_ve_data, tmp_path, variant="paper")
    release = _training_method_config(snli_ve_data, tmp_path, variant="release")
    assert TASK_DEFAULTS["snli_ve"]["release_mu0"] == 10.0
    assert (paper.mu0, release.mu0) == (PAPER_MU0, 10.0) == (0.1, 10.0)
    assert _training_method_config(snli_ve_data, tmp_path, variant="paper", mu0=10.0).mu0 == 10.0  # explicit wins
    assert _training_method_config(snli_ve_data, tmp_path, variant="release", mu0=0.5).mu0 == 0.5
    for task in TASK_DEFAULTS:
        assert PAdapterConfig.for_task(task).mu0 == 0.1  # paper: one mu for every task
        assert PAdapterConfig.for_task(task, variant="release").mu0 == TASK_DEFAULTS[task]["release_mu0"]
    assert PAdapterConfig(variant="release").mu0 == 0.1
    with pytest.raises(ValueError, match="release_mu0"):
        PAdapterConfig(release_mu0=0.0)


def test_release_with_zero_up_starts_as_the_identity():
    model, inputs = _adapted(PAdapterConfig(variant="release", init_weights="zero_up", key_pool_size=8))
    adapted = _logits(model, inputs)
    with model.disable_adapter():
        base = _logits(model, inputs)
    assert torch.equal(adapted, base)


def test_paper_is_not_the_identity_at_init_but_its_default_keeps_the_image(snli_ve_data, tmp_path):
    default = _training_method_config(snli_ve_data, tmp_path, variant="paper", init_weights="zero_up")
    model, inputs = _adapted(default)
    adapted = _logits(model, inputs)
    with model.disable_adapter():
        base = _logits(model, inputs)
    assert (adapted - base).abs().max() > 1e-2  # zero W_up does not make Ū the attention output (§2.6)
    # the image moves the logits about as much as in the base model (measured: 1.20) ...
    assert 0.5 < _image_sensitivity(_training_method_config(snli_ve_data, tmp_path, variant="paper")) < 2.0
    # ... whereas mu0 = 10 (the former SNLI-VE default of `paper`) hides it (measured: 0.031)
    assert _image_sensitivity(_training_method_config(snli_ve_data, tmp_path, variant="paper", mu0=10.0)) < 0.1
