"""The cache-name shim across transformers releases (``cache`` from 5.25, ``past_key_values`` before)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from vlpeft._transformers_compat import (
    CACHE_ARGUMENT,
    cache_argument_of,
    cache_from_kwargs,
    cache_of_output,
    takes_cache_argument,
)
from vlpeft.testing import build_tiny_model


def test_cache_from_kwargs_reads_either_name() -> None:
    cache = object()
    assert cache_from_kwargs({"cache": cache}) is cache
    assert cache_from_kwargs({"past_key_values": cache}) is cache
    assert cache_from_kwargs({"cache": None, "past_key_values": cache}) is cache
    assert cache_from_kwargs({"attention_mask": 1}) is None


def test_cache_argument_of_reads_the_signature() -> None:
    def new_style(x, cache=None):
        return x

    def old_style(x, past_key_values=None):
        return x

    def no_cache(x):
        return x

    assert cache_argument_of(new_style) == "cache"
    assert cache_argument_of(old_style) == "past_key_values"
    assert takes_cache_argument(new_style) and takes_cache_argument(old_style)
    assert not takes_cache_argument(no_cache)


def test_installed_transformers_models_take_the_generation_cache_name() -> None:
    tiny = build_tiny_model("llava")
    assert cache_argument_of(tiny.model.forward) == CACHE_ARGUMENT


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_vision_prefix_model_takes_the_cache_under_either_name(name: str) -> None:
    model, inputs = build_tiny_model("vit_gpt2")
    model.eval()
    with torch.no_grad():
        first = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"][:, :3], use_cache=True)
        cache = cache_of_output(first)
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() > 0
        length = cache.get_seq_length()
        step = model(input_ids=inputs["input_ids"][:, 3:4], pixel_values=inputs["pixel_values"],
                     use_cache=True, **{name: cache})
    assert cache_of_output(step).get_seq_length() == length + 1


def test_vision_prefix_model_rejects_both_cache_names() -> None:
    model, inputs = build_tiny_model("vit_gpt2")
    with pytest.raises(ValueError, match="not both"):
        model(**inputs, cache=DynamicCache(), past_key_values=DynamicCache())


def test_activation_checkpointing_helpers_switch_it_without_the_deprecated_names():
    import warnings

    from vlpeft._transformers_compat import disable_activation_checkpointing, enable_activation_checkpointing
    from vlpeft.testing import build_tiny_model

    model = build_tiny_model("llava", seed=0).model
    flags = lambda: [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]  # noqa: E731
    assert flags() and not any(flags())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)
        enable_activation_checkpointing(model)
        assert any(flags())
        disable_activation_checkpointing(model)
    assert not any(flags())
