"""Which backend ran, per adapted attention block of a model: ``padapter_backends(model)``, one ``vlpeft.backend`` log
record per module at its first adapted call, and the overrides (``PAdapterConfig.backend``, ``VLPEFT_BACKEND``)."""

from __future__ import annotations

import logging

import peft
import pytest
import torch

from vlpeft.functional.p_laplacian import cpu_kernels, triton_support
from vlpeft.functional.p_laplacian.backend import BackendChoice, BackendUnavailableError
from vlpeft.testing import build_tiny_model
from vlpeft.tuners.p_adapter import PAdapterConfig, padapter_backends

KERNELS = cpu_kernels.kernel_available()


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv("VLPEFT_BACKEND", raising=False)
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)


def _model(family="llava", **config):
    torch.manual_seed(0)
    tiny = build_tiny_model(family, seed=0)
    model = peft.get_peft_model(tiny.model, PAdapterConfig(p_init=1.25, key_pool_size=3, **config)).eval()
    return model, tiny.inputs


def _run(model, inputs):
    with torch.no_grad():
        model(**inputs)
    return padapter_backends(model)


def test_query_from_the_model_before_and_after_the_first_call():
    model, inputs = _model(variant="release")
    before = padapter_backends(model)
    assert before and set(before.values()) == {None}
    after = _run(model, inputs)
    assert after.keys() == before.keys()
    for name, choice in after.items():
        assert isinstance(choice, BackendChoice), name
        # Interface model on the CPU: no fused kernels; the tiny prompt is one row block, so the model's eager
        # attention; the float32 aggregation on the C kernels (one torch thread in the tests) where they are built.
        assert choice.attention == "eager" and choice.requested == "auto"
        assert "no fused Triton kernels: " in choice.reason and "no blocked attention: one row block" in choice.reason
        assert choice.name == ("cpu" if KERNELS else "torch")
        if KERNELS:
            assert "aggregation by the fused C kernels (float32 CPU tensors" in choice.reason


def test_inline_attention_modules_report_their_own_attention():
    model, inputs = _model("blip_caption", variant="paper")
    backends = _run(model, inputs)
    assert backends
    for choice in backends.values():
        assert choice.attention == "eager" and "inline attention (computed inside the module" in choice.reason


def test_the_choice_is_logged_once_per_module(caplog):
    model, inputs = _model(variant="paper")
    with caplog.at_level(logging.INFO, logger="vlpeft.backend"):
        _run(model, inputs)
        backends = _run(model, inputs)
    records = [record for record in caplog.records if record.name == "vlpeft.backend"]
    assert sorted(record.getMessage().split(":")[0] for record in records) == sorted(backends)
    assert all(record.levelno == logging.INFO for record in records)
    first = records[0].getMessage()
    name = first.split(":")[0]
    assert first == f"{name}: {backends[name]}"


def test_config_field_and_environment_override(monkeypatch):
    model, inputs = _model(variant="release", backend="torch")
    for choice in _run(model, inputs).values():
        assert (choice.name, choice.requested) == ("torch", "torch")
        assert "aggregation in torch (backend='torch')" in choice.reason
    monkeypatch.setenv("VLPEFT_BACKEND", "torch")
    model, inputs = _model(variant="paper")
    for choice in _run(model, inputs).values():
        assert choice.name == "torch" and "aggregation in torch (VLPEFT_BACKEND=torch)" in choice.reason
    if KERNELS:  # the config field wins over the environment
        model, inputs = _model(variant="paper", backend="cpu")
        assert {choice.name for choice in _run(model, inputs).values()} == {"cpu"}
    with pytest.raises(ValueError, match=r"backend='gpu' is not one of \('auto', 'torch', 'cpu', 'triton'\)"):
        PAdapterConfig(backend="gpu")


@pytest.mark.skipif(triton_support.triton_unavailable_reason() is None, reason="Triton can run here")
def test_impossible_triton_override_is_an_error(monkeypatch):
    with pytest.raises(BackendUnavailableError, match=r"backend='triton' asks for the fused Triton kernels, but "
                                                      r".*; available here: torch"):
        _model(variant="release", backend="triton")
    model, inputs = _model(variant="release")
    monkeypatch.setenv("VLPEFT_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match=r"VLPEFT_BACKEND=triton asks for the fused Triton kernels"):
        _run(model, inputs)


def test_triton_override_where_the_kernels_cannot_run_falls_back_with_a_warning(monkeypatch, caplog):
    """Triton present, but the model is on the CPU: each call falls back, says why, and the module logs a warning."""
    monkeypatch.setattr(triton_support, "triton_unavailable_reason", lambda: None)
    model, inputs = _model(variant="release", backend="triton")
    with caplog.at_level(logging.INFO, logger="vlpeft.backend"):
        backends = _run(model, inputs)
    for choice in backends.values():
        assert choice.requested == "triton" and choice.attention == "eager" and choice.name != "triton"
        assert "backend='triton' asks for the fused Triton kernels, which do not apply: the tensors are on cpu" \
            in choice.reason
    assert {record.levelno for record in caplog.records if record.name == "vlpeft.backend"} == {logging.WARNING}
