"""What each tiny family is: its configuration recipe (config, model constructor, input layout) and the sizes and
override keys :func:`vlpeft.models.tiny.build_tiny_model` accepts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForQuestionAnswering,
    GitConfig,
    GitForCausalLM,
    GPT2Config,
    LlavaConfig,
    LlavaForConditionalGeneration,
    OPTConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PreTrainedConfig,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
)

from vlpeft.models.configuration_clip_bart import ClipBartConfig
from vlpeft.models.configuration_vision_prefix_lm import VisionPrefixLMConfig
from vlpeft.models.modeling_clip_bart import ClipBartForConditionalGeneration
from vlpeft.models.modeling_vision_prefix_lm import build_vision_prefix_lm
from vlpeft.models.tiny.tokens import BOS_TOKEN_ID, EOS_TOKEN_ID, IMAGE_TOKEN_ID, PAD_TOKEN_ID, SPECIAL_TOKENS

__all__ = [
    "BUILDERS",
    "COMMON_KEYS",
    "DEFAULT_SIZES",
    "EXTRA_KEYS",
    "FAMILIES",
    "FAMILY_SIZES",
    "GENERATIVE_FAMILIES",
    "SIZE_KEYS",
    "Recipe",
]

# Keys every family accepts in ``build_tiny_model(**overrides)``.
SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "image_size",
    "patch_size",
    "max_position_embeddings",
)
COMMON_KEYS = (*SIZE_KEYS, "attn_implementation", "dropout", "initializer_range")

DEFAULT_SIZES: dict[str, int] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 99,
    "image_size": 32,
    "patch_size": 8,
    "max_position_embeddings": 128,
}

# Family-specific defaults: CLIP-BART's 56 x 56 images give a 7 x 7 patch grid (as CLIP ViT-B/32 at 224), which
# its pooling downsamples to 6 x 6 = 36 visual tokens.
FAMILY_SIZES: dict[str, dict[str, int]] = {"clip_bart": {"image_size": 56}}




# ---------------------------------------------------------------------------------------------- configs
# A builder returns (config, model class, info); ``info`` holds ``layout`` and optional ``image_token_id``,
# ``num_image_tokens``, ``num_labels``.
Recipe = tuple[PreTrainedConfig, Callable[[PreTrainedConfig], nn.Module], dict[str, Any]]


def _vision_dict(sizes: dict[str, int]) -> dict[str, int]:
    return {
        k: sizes[k]
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
        )
    }


def _text_dict(sizes: dict[str, int]) -> dict[str, int]:
    return {
        k: sizes[k]
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        )
    }


def _llama_dict(sizes: dict[str, int]) -> dict[str, Any]:
    heads = sizes["num_attention_heads"]
    return {
        **_text_dict(sizes),
        "num_key_value_heads": 2 if heads % 2 == 0 else heads,
        "head_dim": sizes["hidden_size"] // heads,
        **SPECIAL_TOKENS,
    }


def _num_patches(sizes: dict[str, int]) -> int:
    if sizes["image_size"] % sizes["patch_size"]:
        raise ValueError(
            f"image_size={sizes['image_size']} must be a multiple of patch_size={sizes['patch_size']}"
        )
    return (sizes["image_size"] // sizes["patch_size"]) ** 2


def _blip_config(sizes: dict[str, int]) -> BlipConfig:
    text = {
        **_text_dict(sizes),
        "encoder_hidden_size": sizes["hidden_size"],
        "sep_token_id": EOS_TOKEN_ID,
        **SPECIAL_TOKENS,
    }
    return BlipConfig(
        text_config=text, vision_config=_vision_dict(sizes), projection_dim=16, image_text_hidden_size=16
    )


def _build_blip_vqa(sizes: dict[str, int], extra: dict[str, Any]) -> Recipe:
    return _blip_config(sizes), BlipForQuestionAnswering, {"layout": "blip_vqa"}


def _build_blip_caption(sizes: dict[str, int], extra: dict[str, Any]) -> Recipe:
    return _blip_config(sizes), BlipForConditionalGeneration, {"layout": "bos_caption"}


def _build_blip2(sizes: dict[str, int], extra: dict[str, Any]) -> Recipe:
    num_query_tokens = 4
    opt = OPTConfig(
        vocab_size=sizes["vocab_size"],
        hidden_size=sizes["hidden_size"],
        ffn_dim=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        max_position_embeddings=sizes["max_position_embeddings"],
        word_embed_proj_dim=sizes["hidden_size"],
        **SPECIAL_TOKENS,
    )
    config = Blip2Config(
        vision_config=_vision_dict(sizes),
        qformer_config={
            **_text_dict(sizes),
            "encoder_hidden_size": sizes["hidden_size"],
            "cross_attention_frequency": 1,
            "pad_token_id": PAD_TOKEN_ID,
        },
        text_config=opt.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=IMAGE_TOKEN_ID,
    )
    return (
        config,
        Blip2ForConditionalGeneration,
        {"layout": "image_tokens", "image_token_id": IMAGE_TOKEN_ID, "num_image_tokens": num_query_tokens},
    )


def _build_llava(sizes: dict[str, int], extra: dict[str, Any]) -> Recipe:
    num_image_tokens = _num_patches(sizes)
    config = LlavaConfig(
        vision_config={**_vision_dict(sizes), "model_type": "clip_vision_model"},
        text_config={**_llama_dict(sizes), "model_type": "llama"},
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=num_image_tokens,
        vision_feature_layer=-1,
    )
    return (
        config,
        LlavaForConditionalGeneration,
        {"layout": "image_tokens", "image_token_id": IMAGE_TOKEN_ID, "num_image_tokens": num_image_tokens},
    )


def _build_paligemma(sizes: dict[str, int], extra: dict[str, Any]) -> Recipe:
    num_image_tokens = _num_patches(sizes)
    config = PaliGemmaConfig(
        vision_config={**_vision_dict(sizes), "model_type": "siglip_vision_model"},
        text_config={**_llama_dict(sizes), "model_type": "gemma"},
        image_token_index=IMAGE_TOKEN_ID,
        projection_dim=sizes["hidden_size"],
    )
    return (
        config,
        PaliGemmaForConditionalGeneration,
        {"layout": "image_tokens", "image_token_id": IMAGE_TOKEN_ID, "num_image_tokens": num_image_tokens,
         "token_type_ids": True},
    )


def _build_vision_encoder_decoder(sizes: dict[str, int], extra: dict[str, Any]) -> Recipe:
    decoder = GPT2Config(
        vocab_size=sizes["vocab_size"],
        n_embd=sizes["hidden_size"],
        n_inner=sizes["intermediate_size"],
        n_layer=sizes["num_hidden_layers"],
        n_head=sizes["num_attention_heads"],
        n_positions=sizes["max_position_embeddings"],
        add_cross_attention=True,
        is_decoder=True,
        **SPECIAL_TOKENS,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(**_vision_dict(sizes)), decoder
    )
    config.pad_token_id = PAD_TOKEN_ID
    config.decoder_start_token_id = BOS_TOKEN_ID
    config.eos_token_id = EOS_TOKEN_ID
    return config, VisionEncoderDecoderModel, {"layout": "encoder_decoder"}


def _build_git(sizes: dict[str, int], extra: dict[str, Any]) -> Recipe:
    config = GitConfig(vision_config=_vision_dict(sizes), **_text_dict(sizes), **SPECIAL_TOKENS)
    return config, GitForCausalLM, {"layout": "bos_caption"}


# Config fields of the vlpeft composite that the ``vit_*`` families accept as overrides.
_COMPOSITE_KEYS = (
    "num_labels",
    "problem_type",
    "prefix_tokens",
    "visual_features",
    "use_visual_prefix",
    "prefix_projector",
    "head_pooling",
    "classifier_hidden_size",
    "classifier_dropout",
    "skip_first_token_loss",
    "vision_hidden_size",
)


def _composite_recipe(sizes: dict[str, int], extra: dict[str, Any], text_config: dict[str, Any]) -> Recipe:
    extra = dict(extra)
    vision = _vision_dict(sizes)
    vision["hidden_size"] = extra.pop("vision_hidden_size", vision["hidden_size"])
    vision["model_type"] = "vit"
    if text_config["model_type"] != "gpt2":
        extra.setdefault("num_labels", 10)
    config = VisionPrefixLMConfig(vision_config=vision, text_config=text_config, **extra)
    info: dict[str, Any] = {"layout": "prefix_decoder" if config.task == "causal_lm" else "prefix_classifier"}
    if config.task == "classification":
        info["num_labels"] = config.num_labels
    return config, build_vision_prefix_lm, info


def _build_vit_bert(sizes: dict[str, int], extra: dict[str, Any]) -> Recipe:
    text = {**_text_dict(sizes), "model_type": "bert", "type_vocab_size": 2, **SPECIAL_TOKENS}
    return _composite_recipe(sizes, extra, text)


def _build_vit_roberta(sizes: dict[str, int], extra: dict[str, Any]) -> Recipe:
    # RoBERTa positions start at pad_token_id + 1, hence the two extra positions.
    text = {**_text_dict(sizes), "model_type": "roberta", "type_vocab_size": 1, **SPECIAL_TOKENS}
    text["max_position_embeddings"] += 2
    return _composite_recipe(sizes, extra, text)


def _build_vit_gpt2(sizes: dict[str, int], extra: dict[str, Any]) -> Recipe:
    text = {
        "model_type": "gpt2",
        "vocab_size": sizes["vocab_size"],
        "n_embd": sizes["hidden_size"],
        "n_inner": sizes["intermediate_size"],
        "n_layer": sizes["num_hidden_layers"],
        "n_head": sizes["num_attention_heads"],
        "n_positions": sizes["max_position_embeddings"],
        **SPECIAL_TOKENS,
    }
    return _composite_recipe(sizes, extra, text)


def _build_clip_bart(sizes: dict[str, int], extra: dict[str, Any]) -> Recipe:
    """CLIP vision (a 7 x 7 patch grid by default, pooled to 6 x 6 = 36 tokens) + BART (decoder starts at eos)."""
    vision = {**_vision_dict(sizes), "model_type": "clip_vision_model"}
    text = {
        "model_type": "bart",
        "vocab_size": sizes["vocab_size"],
        "d_model": sizes["hidden_size"],
        "encoder_layers": sizes["num_hidden_layers"],
        "decoder_layers": sizes["num_hidden_layers"],
        "encoder_attention_heads": sizes["num_attention_heads"],
        "decoder_attention_heads": sizes["num_attention_heads"],
        "encoder_ffn_dim": sizes["intermediate_size"],
        "decoder_ffn_dim": sizes["intermediate_size"],
        "max_position_embeddings": sizes["max_position_embeddings"],
        "decoder_start_token_id": EOS_TOKEN_ID,  # as BART: decoding starts from </s>
        "forced_bos_token_id": None,
        "forced_eos_token_id": None,
        **SPECIAL_TOKENS,
    }
    config = ClipBartConfig(vision_config=vision, text_config=text, **extra)
    return config, ClipBartForConditionalGeneration, {"layout": "clip_bart"}


BUILDERS: dict[str, Callable[[dict[str, int], dict[str, Any]], Recipe]] = {
    "blip_vqa": _build_blip_vqa,
    "blip_caption": _build_blip_caption,
    "blip2": _build_blip2,
    "llava": _build_llava,
    "paligemma": _build_paligemma,
    "vision_encoder_decoder": _build_vision_encoder_decoder,
    "git": _build_git,
    "vit_bert": _build_vit_bert,
    "vit_roberta": _build_vit_roberta,
    "vit_gpt2": _build_vit_gpt2,
    "clip_bart": _build_clip_bart,
}

# Family-specific override keys (beyond the common ones) accepted by each builder.
EXTRA_KEYS: dict[str, tuple[str, ...]] = {name: () for name in BUILDERS}
EXTRA_KEYS.update({name: _COMPOSITE_KEYS for name in ("vit_bert", "vit_roberta", "vit_gpt2")})
EXTRA_KEYS["clip_bart"] = ("num_visual_tokens", "downsample_pooling", "visual_layer_norm", "freeze_vision_model")

FAMILIES: tuple[str, ...] = tuple(BUILDERS)
#: Families whose models support ``generate()`` (all but the composite classifiers).
GENERATIVE_FAMILIES: tuple[str, ...] = tuple(f for f in FAMILIES if f not in ("vit_bert", "vit_roberta"))
