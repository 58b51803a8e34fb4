"""Tiny random-config vision-language models for tests, examples and the demo.

``build_tiny_model(family)`` builds a randomly initialised model of a supported family with the tiny
configuration of ``ecosystem.md`` §4 (width 32, 2 layers, 4 heads, 32x32 images with 8x8 patches, vocabulary 99)
and returns a :class:`TinyModel`, which knows how to make valid forward and ``generate()`` inputs for it.

Token-id convention shared by every family (all ids fit the vocabulary of 99):

====  =====================================================
 id   meaning
====  =====================================================
 0    padding
 1    beginning of sequence (BLIP/GIT ``[CLS]``/bos)
 2    end of sequence / separator (BLIP ``[SEP]``)
 3    image placeholder (BLIP-2, LLaVA, PaliGemma)
 4    reserved (unused by the generated inputs)
 5+   ordinary text tokens
====  =====================================================

Building is deterministic in ``seed`` and does not touch the global torch RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
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

from vlpeft.models import (
    ClipBartConfig,
    ClipBartForConditionalGeneration,
    VisionPrefixLMConfig,
    build_vision_prefix_lm,
)
from vlpeft.testing.images import random_pixel_values

__all__ = [
    "FAMILIES",
    "GENERATIVE_FAMILIES",
    "PAD_TOKEN_ID",
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "IMAGE_TOKEN_ID",
    "FIRST_TEXT_TOKEN_ID",
    "TinyModel",
    "build_tiny_model",
]

PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
IMAGE_TOKEN_ID = 3
FIRST_TEXT_TOKEN_ID = 5

# Keys every family accepts in ``build_tiny_model(**overrides)``.
_SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "image_size",
    "patch_size",
    "max_position_embeddings",
)
_COMMON_KEYS = (*_SIZE_KEYS, "attn_implementation", "dropout", "initializer_range")

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

_DEFAULT_SIZES: dict[str, int] = {
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
_FAMILY_SIZES: dict[str, dict[str, int]] = {"clip_bart": {"image_size": 56}}

_SPECIAL_TOKENS = {"pad_token_id": PAD_TOKEN_ID, "bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID}


@dataclass
class TinyModel:
    """A tiny model and what is needed to feed it.

    Attributes:
        model: the randomly initialised model (train mode, as constructed).
        family: the family name (one of :data:`FAMILIES`).
        layout: how inputs are laid out: ``"blip_vqa"``, ``"bos_caption"`` (BLIP caption, GIT),
            ``"image_tokens"`` (BLIP-2, LLaVA, PaliGemma), ``"encoder_decoder"``,
            ``"prefix_classifier"`` / ``"prefix_decoder"`` (vlpeft composite), ``"clip_bart"`` (question ids in
            the encoder with the image, answer ``labels`` for BART's decoder).
        vocab_size: text vocabulary size.
        image_size: edge length of ``pixel_values``.
        image_token_id: id of the image placeholder token, or ``None`` if the family has none.
        num_image_tokens: how many placeholder tokens one image occupies in ``input_ids`` (0 if none).
        is_generative: whether ``model.generate`` is supported.
        num_labels: classifier width for ``prefix_classifier`` models, else ``None``.
        inputs: example forward inputs with labels (batch 2, distinct images), from :meth:`example_inputs`.
        seed: the seed the model and ``inputs`` were made with.
    """

    model: nn.Module
    family: str
    layout: str
    vocab_size: int
    image_size: int
    image_token_id: int | None = None
    num_image_tokens: int = 0
    is_generative: bool = True
    num_labels: int | None = None
    seed: int = 0
    pad_token_id: int = PAD_TOKEN_ID
    bos_token_id: int = BOS_TOKEN_ID
    eos_token_id: int = EOS_TOKEN_ID
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        """Allow ``model, inputs = build_tiny_model(...)``."""
        yield self.model
        yield self.inputs

    # ------------------------------------------------------------------ inputs
    def example_inputs(
        self,
        batch_size: int = 2,
        seq_len: int = 6,
        *,
        seed: int | None = None,
        with_labels: bool = True,
        num_padding: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Valid training/forward inputs for this model.

        Args:
            batch_size: number of examples; each gets a different image.
            seq_len: number of ordinary text tokens per example (>= 2), before special and image tokens.
            seed: seed of the token and image generator (defaults to the model's seed).
            with_labels: include ``labels`` so that the forward returns a loss.
            num_padding: how many trailing text tokens of the **last** example are replaced by padding
                (right padding; masked in ``attention_mask`` and ``-100`` in ``labels``).

        Returns:
            A dict of tensors for ``model(**inputs)``. ``pixel_values`` is (batch, 3, image_size, image_size);
            ``input_ids``/``attention_mask``/``labels`` are (batch, length) where present; for
            ``prefix_classifier`` models ``labels`` is (batch, num_labels) soft scores, or (batch,) class ids
            for single-label problems.
        """
        return self._make_inputs(batch_size, seq_len, seed, with_labels, num_padding, for_generation=False)

    def generation_inputs(
        self, batch_size: int = 2, seq_len: int = 4, *, seed: int | None = None, num_padding: int = 0
    ) -> dict[str, torch.Tensor]:
        """Inputs for ``model.generate(**inputs)`` (no labels).

        Decoder-only language models get a prompt of ``seq_len`` text tokens after the image tokens; with
        ``num_padding > 0`` the last prompt is shortened and **left**-padded, as decoder-only generation needs.
        Families that generate from the image alone (BLIP caption, GIT, encoder-decoder, composite decoder) get
        only ``pixel_values``; BLIP VQA and CLIP-BART get the question.
        """
        if not self.is_generative:
            raise ValueError(f"family {self.family!r} is not generative; it has no generation inputs")
        return self._make_inputs(batch_size, seq_len, seed, False, num_padding, for_generation=True)

    def _make_inputs(
        self,
        batch_size: int,
        seq_len: int,
        seed: int | None,
        with_labels: bool,
        num_padding: int,
        for_generation: bool,
    ) -> dict[str, torch.Tensor]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 text tokens, got {seq_len}")
        if not 0 <= num_padding < seq_len:
            raise ValueError(f"num_padding must be in [0, seq_len={seq_len}), got {num_padding}")
        seed = self.seed if seed is None else seed
        generator = torch.Generator().manual_seed(seed)
        pixel_values = random_pixel_values(batch_size, self.image_size, seed=seed)

        def text(length: int) -> torch.Tensor:
            return torch.randint(
                FIRST_TEXT_TOKEN_ID, self.vocab_size, (batch_size, length), generator=generator
            )

        def valid_lengths(length: int) -> list[int]:
            return [length] * (batch_size - 1) + [length - num_padding]

        layout = self.layout
        if layout == "clip_bart":
            # Question (right-padded, eos-terminated) in the encoder; an answer of 2 tokens + eos as labels.
            lengths = valid_lengths(seq_len)
            question = _right_pad(
                _append_eos(text(seq_len), lengths, self.eos_token_id, self.pad_token_id),
                [n + 1 for n in lengths],
                self.pad_token_id,
            )
            inputs = {"input_ids": question["input_ids"], "attention_mask": question["attention_mask"]}
            inputs["pixel_values"] = pixel_values
            if with_labels and not for_generation:
                eos = torch.full((batch_size, 1), self.eos_token_id)
                inputs["labels"] = torch.cat([text(2), eos], dim=1)
            return inputs

        if layout == "blip_vqa":
            question = _right_pad(text(seq_len), valid_lengths(seq_len), self.pad_token_id)
            inputs = {"pixel_values": pixel_values, **question}
            if with_labels and not for_generation:
                answer = text(2)
                bos = torch.full((batch_size, 1), self.bos_token_id)
                eos = torch.full((batch_size, 1), self.eos_token_id)
                # BLIP VQA feeds ``labels`` as decoder inputs as well, so they must be valid token ids.
                inputs["labels"] = torch.cat([bos, answer, eos], dim=1)
            return inputs

        if layout in ("bos_caption", "encoder_decoder", "prefix_decoder"):
            if for_generation:
                return {"pixel_values": pixel_values}
            body = text(seq_len)
            if layout == "bos_caption":
                ids = torch.cat([torch.full((batch_size, 1), self.bos_token_id), body], dim=1)
                lengths = [n + 1 for n in valid_lengths(seq_len)]
            else:
                ids = body
                lengths = valid_lengths(seq_len)
            ids = _append_eos(ids, lengths, self.eos_token_id, self.pad_token_id)
            lengths = [n + 1 for n in lengths]
            padded = _right_pad(ids, lengths, self.pad_token_id)
            labels = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, -100)
            if layout == "encoder_decoder":
                return (
                    {"pixel_values": pixel_values, "labels": labels}
                    if with_labels
                    else {
                        "pixel_values": pixel_values,
                        "decoder_input_ids": padded["input_ids"],
                        "decoder_attention_mask": padded["attention_mask"],
                    }
                )
            inputs = {"pixel_values": pixel_values, **padded}
            if with_labels:
                inputs["labels"] = labels
            return inputs

        if layout == "prefix_classifier":
            inputs = {"pixel_values": pixel_values, **_right_pad(text(seq_len), valid_lengths(seq_len), 0)}
            if with_labels:
                assert self.num_labels is not None
                if getattr(self.model.config, "problem_type", None) == "single_label_classification":
                    inputs["labels"] = torch.randint(0, self.num_labels, (batch_size,), generator=generator)
                else:
                    scores = torch.rand((batch_size, self.num_labels), generator=generator)
                    inputs["labels"] = torch.where(scores > 0.7, scores, torch.zeros_like(scores))
            return inputs

        if layout == "image_tokens":
            return self._image_token_inputs(
                text, pixel_values, seq_len, with_labels, num_padding, for_generation
            )

        raise AssertionError(f"unknown layout {layout!r}")

    def _image_token_inputs(
        self,
        text: Callable[[int], torch.Tensor],
        pixel_values: torch.Tensor,
        seq_len: int,
        with_labels: bool,
        num_padding: int,
        for_generation: bool,
    ) -> dict[str, torch.Tensor]:
        """``[image]*k, bos, prompt..., answer..., eos``; labels only on the answer (and eos)."""
        batch_size = pixel_values.shape[0]
        assert self.image_token_id is not None
        image = torch.full((batch_size, self.num_image_tokens), self.image_token_id)
        bos = torch.full((batch_size, 1), self.bos_token_id)
        if for_generation:
            prompt = text(seq_len)
            ids = torch.cat([image, bos, prompt], dim=1)
            mask = torch.ones_like(ids)
            if num_padding:
                # Drop the last ``num_padding`` prompt tokens of the last example and left-pad it.
                keep = ids[-1, : ids.shape[1] - num_padding]
                ids[-1] = torch.cat([torch.full((num_padding,), self.pad_token_id), keep])
                mask[-1, :num_padding] = 0
            inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}
            if self.family == "paligemma":
                inputs["token_type_ids"] = torch.zeros_like(ids)
            return inputs

        prompt_len = seq_len // 2
        answer_len = seq_len - prompt_len
        ids = torch.cat([image, bos, text(prompt_len), text(answer_len)], dim=1)
        lengths = [ids.shape[1]] * (batch_size - 1) + [ids.shape[1] - num_padding]
        ids = _append_eos(ids, lengths, self.eos_token_id, self.pad_token_id)
        lengths = [n + 1 for n in lengths]
        padded = _right_pad(ids, lengths, self.pad_token_id)
        answer_start = self.num_image_tokens + 1 + prompt_len
        is_answer = torch.zeros_like(ids, dtype=torch.bool)
        is_answer[:, answer_start:] = True
        is_answer &= padded["attention_mask"].bool()
        inputs = {"pixel_values": pixel_values, **padded}
        if self.family == "paligemma":
            inputs["token_type_ids"] = is_answer.long()
        if with_labels:
            inputs["labels"] = padded["input_ids"].masked_fill(~is_answer, -100)
        return inputs


def _append_eos(ids: torch.Tensor, lengths: list[int], eos: int, pad: int) -> torch.Tensor:
    """Append one column and put ``eos`` right after each example's ``lengths[i]`` valid tokens."""
    out = torch.cat([ids, torch.full((ids.shape[0], 1), pad)], dim=1)
    for row, length in enumerate(lengths):
        out[row, length] = eos
    return out


def _right_pad(ids: torch.Tensor, lengths: list[int], pad: int) -> dict[str, torch.Tensor]:
    """Replace positions at or after ``lengths[i]`` by ``pad`` and build the matching attention mask."""
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    mask = (positions < torch.tensor(lengths).unsqueeze(1)).long()
    return {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}


# ---------------------------------------------------------------------------------------------- configs
# A builder returns (config, model class, info); ``info`` holds ``layout`` and optional ``image_token_id``,
# ``num_image_tokens``, ``num_labels``.
_Recipe = tuple[PreTrainedConfig, Callable[[PreTrainedConfig], nn.Module], dict[str, Any]]


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
        **_SPECIAL_TOKENS,
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
        **_SPECIAL_TOKENS,
    }
    return BlipConfig(
        text_config=text, vision_config=_vision_dict(sizes), projection_dim=16, image_text_hidden_size=16
    )


def _build_blip_vqa(sizes: dict[str, int], extra: dict[str, Any]) -> _Recipe:
    return _blip_config(sizes), BlipForQuestionAnswering, {"layout": "blip_vqa"}


def _build_blip_caption(sizes: dict[str, int], extra: dict[str, Any]) -> _Recipe:
    return _blip_config(sizes), BlipForConditionalGeneration, {"layout": "bos_caption"}


def _build_blip2(sizes: dict[str, int], extra: dict[str, Any]) -> _Recipe:
    num_query_tokens = 4
    opt = OPTConfig(
        vocab_size=sizes["vocab_size"],
        hidden_size=sizes["hidden_size"],
        ffn_dim=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        max_position_embeddings=sizes["max_position_embeddings"],
        word_embed_proj_dim=sizes["hidden_size"],
        **_SPECIAL_TOKENS,
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


def _build_llava(sizes: dict[str, int], extra: dict[str, Any]) -> _Recipe:
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


def _build_paligemma(sizes: dict[str, int], extra: dict[str, Any]) -> _Recipe:
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
        {"layout": "image_tokens", "image_token_id": IMAGE_TOKEN_ID, "num_image_tokens": num_image_tokens},
    )


def _build_vision_encoder_decoder(sizes: dict[str, int], extra: dict[str, Any]) -> _Recipe:
    decoder = GPT2Config(
        vocab_size=sizes["vocab_size"],
        n_embd=sizes["hidden_size"],
        n_inner=sizes["intermediate_size"],
        n_layer=sizes["num_hidden_layers"],
        n_head=sizes["num_attention_heads"],
        n_positions=sizes["max_position_embeddings"],
        add_cross_attention=True,
        is_decoder=True,
        **_SPECIAL_TOKENS,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(**_vision_dict(sizes)), decoder
    )
    config.pad_token_id = PAD_TOKEN_ID
    config.decoder_start_token_id = BOS_TOKEN_ID
    config.eos_token_id = EOS_TOKEN_ID
    return config, VisionEncoderDecoderModel, {"layout": "encoder_decoder"}


def _build_git(sizes: dict[str, int], extra: dict[str, Any]) -> _Recipe:
    config = GitConfig(vision_config=_vision_dict(sizes), **_text_dict(sizes), **_SPECIAL_TOKENS)
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


def _composite_recipe(sizes: dict[str, int], extra: dict[str, Any], text_config: dict[str, Any]) -> _Recipe:
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


def _build_vit_bert(sizes: dict[str, int], extra: dict[str, Any]) -> _Recipe:
    text = {**_text_dict(sizes), "model_type": "bert", "type_vocab_size": 2, **_SPECIAL_TOKENS}
    return _composite_recipe(sizes, extra, text)


def _build_vit_roberta(sizes: dict[str, int], extra: dict[str, Any]) -> _Recipe:
    # RoBERTa positions start at pad_token_id + 1, hence the two extra positions.
    text = {**_text_dict(sizes), "model_type": "roberta", "type_vocab_size": 1, **_SPECIAL_TOKENS}
    text["max_position_embeddings"] += 2
    return _composite_recipe(sizes, extra, text)


def _build_vit_gpt2(sizes: dict[str, int], extra: dict[str, Any]) -> _Recipe:
    text = {
        "model_type": "gpt2",
        "vocab_size": sizes["vocab_size"],
        "n_embd": sizes["hidden_size"],
        "n_inner": sizes["intermediate_size"],
        "n_layer": sizes["num_hidden_layers"],
        "n_head": sizes["num_attention_heads"],
        "n_positions": sizes["max_position_embeddings"],
        **_SPECIAL_TOKENS,
    }
    return _composite_recipe(sizes, extra, text)


def _build_clip_bart(sizes: dict[str, int], extra: dict[str, Any]) -> _Recipe:
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
        **_SPECIAL_TOKENS,
    }
    config = ClipBartConfig(vision_config=vision, text_config=text, **extra)
    return config, ClipBartForConditionalGeneration, {"layout": "clip_bart"}


_BUILDERS: dict[str, Callable[[dict[str, int], dict[str, Any]], _Recipe]] = {
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
_EXTRA_KEYS: dict[str, tuple[str, ...]] = {name: () for name in _BUILDERS}
_EXTRA_KEYS.update({name: _COMPOSITE_KEYS for name in ("vit_bert", "vit_roberta", "vit_gpt2")})
_EXTRA_KEYS["clip_bart"] = ("num_visual_tokens", "downsample_pooling", "visual_layer_norm", "freeze_vision_model")

FAMILIES: tuple[str, ...] = tuple(_BUILDERS)
#: Families whose models support ``generate()`` (all but the composite classifiers).
GENERATIVE_FAMILIES: tuple[str, ...] = tuple(f for f in FAMILIES if f not in ("vit_bert", "vit_roberta"))


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
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {sorted(_BUILDERS)}")
    allowed = set(_COMMON_KEYS) | set(_EXTRA_KEYS[family])
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(
            f"build_tiny_model({family!r}): unknown overrides {unknown}; allowed: {sorted(allowed)}"
        )
    sizes = {
        **_DEFAULT_SIZES,
        **_FAMILY_SIZES.get(family, {}),
        **{k: v for k, v in overrides.items() if k in _SIZE_KEYS},
    }
    if sizes["vocab_size"] <= FIRST_TEXT_TOKEN_ID + 1:
        raise ValueError(f"vocab_size must exceed {FIRST_TEXT_TOKEN_ID + 1}, got {sizes['vocab_size']}")
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise ValueError(
            f"hidden_size={sizes['hidden_size']} must be divisible by num_attention_heads="
            f"{sizes['num_attention_heads']}"
        )
    extra = {k: v for k, v in overrides.items() if k in _EXTRA_KEYS[family]}

    dropout = float(overrides.get("dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    # HF's usual 0.02 makes tiny random models almost blind to the image (identical greedy outputs for
    # different images); 0.2 keeps outputs image-dependent, so tests about image routing can fail.
    initializer_range = overrides.get("initializer_range", 0.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config, model_class, info = _BUILDERS[family](sizes, extra)
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
        is_generative=family in GENERATIVE_FAMILIES,
        num_labels=info.get("num_labels"),
        seed=seed,
    )
    tiny.inputs = tiny.example_inputs()
    return tiny
