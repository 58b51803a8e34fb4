"""``build_tiny_model(family)``: a randomly initialised tiny model of a family (see :mod:`vlpeft.models.tiny`),
deterministic in its seed, with example inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig

from vlpeft.models.tiny.model import TinyModel
from vlpeft.models.tiny.recipes import (
    BUILDERS,
    COMMON_KEYS,
    DEFAULT_SIZES,
    EXTRA_KEYS,
    FAMILY_SIZES,
    GENERATIVE_FAMILIES,
    SIZE_KEYS,
)
from vlpeft.models.tiny.tokens import BOS_TOKEN_ID, EOS_TOKEN_ID, FIRST_TEXT_TOKEN_ID, PAD_TOKEN_ID

__all__ = ["build_tiny_model"]

# Dropout-probability fields of the configs used here; ``dropout`` (default 0.0) sets all that a config has,
# so that train-mode forwards are deterministic.
_DROPOUT_FIELDS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "attention_dropout",
    "dropout",
    "activation_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "summary_first_dropout",
)


def _finalise_config(config: PreTrainedConfig, dropout: float, initializer_range: float | None) -> None:
    """Set the dropout fields (and ``initializer_range`` if given) of ``config`` and all its sub-configs."""
    for key in _DROPOUT_FIELDS:
        if hasattr(config, key) and isinstance(getattr(config, key), float | int):
            setattr(config, key, dropout)
    if initializer_range is not None:
        for key in ("initializer_range", "init_std"):  # OPT calls it ``init_std``
            if hasattr(config, key):
                setattr(config, key, float(initializer_range))
    for value in list(vars(config).values()):
        if isinstance(value, PreTrainedConfig):
            _finalise_config(value, dropout, initializer_range)


def _configure_generation(model: nn.Module) -> None:
    """Point every generation config (BLIP's text decoder has its own) at the tiny vocabulary's special
    tokens and keep outputs short (8 new tokens)."""
    for module in model.modules():
        generation_config = getattr(module, "generation_config", None)
        if generation_config is None:
            continue
        generation_config.pad_token_id = PAD_TOKEN_ID
        generation_config.bos_token_id = BOS_TOKEN_ID
        generation_config.eos_token_id = EOS_TOKEN_ID
        generation_config.decoder_start_token_id = getattr(module.config, "decoder_start_token_id", None)
        generation_config.max_new_tokens = 8
        generation_config.max_length = None


def build_tiny_model(family: str, *, seed: int = 0, **overrides: Any) -> TinyModel:
    """Build a tiny randomly initialised model of ``family`` and example inputs for it.

    Args:
        family: one of :data:`FAMILIES`.
        seed: seed of the weight initialisation and of the example inputs. The global torch RNG state is
            restored afterwards.
        **overrides: size overrides shared by both towers (``hidden_size``, ``intermediate_size``,
            ``num_hidden_layers``, ``num_attention_heads``, ``vocab_size``, ``image_size``, ``patch_size``,
            ``max_position_embeddings``), ``attn_implementation`` (applied with ``set_attn_implementation``),
            ``dropout`` (every dropout probability of every sub-config; default 0.0 so train-mode forwards are
            deterministic), ``initializer_range`` (default 0.2, see below), and
            family-specific keys (the composite families accept :class:`~vlpeft.models.VisionPrefixLMConfig`
            fields such as ``prefix_tokens``, ``num_labels``, ``problem_type``, ``pooling``).

    The default ``initializer_range`` of 0.2 (instead of HF's 0.02) makes outputs depend visibly on the image:
    with 0.02 several families greedily generate the same tokens for different images.

    Returns:
        A :class:`TinyModel`; ``tiny.model`` is the model and ``tiny.inputs`` a batch of two examples with labels.
        It unpacks as ``model, inputs = build_tiny_model(...)``.
    """
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {sorted(BUILDERS)}")
    allowed = set(COMMON_KEYS) | set(EXTRA_KEYS[family])
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(
            f"build_tiny_model({family!r}): unknown overrides {unknown}; allowed: {sorted(allowed)}"
        )
    sizes = {
        **DEFAULT_SIZES,
        **FAMILY_SIZES.get(family, {}),
        **{k: v for k, v in overrides.items() if k in SIZE_KEYS},
    }
    if sizes["vocab_size"] <= FIRST_TEXT_TOKEN_ID + 1:
        raise ValueError(f"vocab_size must exceed {FIRST_TEXT_TOKEN_ID + 1}, got {sizes['vocab_size']}")
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise ValueError(
            f"hidden_size={sizes['hidden_size']} must be divisible by num_attention_heads="
            f"{sizes['num_attention_heads']}"
        )
    extra = {k: v for k, v in overrides.items() if k in EXTRA_KEYS[family]}

    dropout = float(overrides.get("dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    # HF's usual 0.02 makes tiny random models almost blind to the image (identical greedy outputs for
    # different images); 0.2 keeps outputs image-dependent, so tests about image routing can fail.
    initializer_range = overrides.get("initializer_range", 0.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config, model_class, info = BUILDERS[family](sizes, extra)
        _finalise_config(config, dropout, initializer_range)
        model = model_class(config)
    _configure_generation(model)
    attn_implementation = overrides.get("attn_implementation")
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)

    tiny = TinyModel(
        model=model,
        family=family,
        layout=info["layout"],
        vocab_size=sizes["vocab_size"],
        image_size=sizes["image_size"],
        image_token_id=info.get("image_token_id"),
        num_image_tokens=info.get("num_image_tokens", 0),
        token_type_ids=info.get("token_type_ids", False),
        is_generative=family in GENERATIVE_FAMILIES,
        num_labels=info.get("num_labels"),
        seed=seed,
    )
    tiny.inputs = tiny.example_inputs()
    return tiny
