"""One family's (prompt, target) token sequences, for training and for inference, as its layout states.

:class:`SequenceEncoder` reads the family's :class:`~vlpeft.tasks.layouts.InputLayout`: the special ids (begin,
end, pad, image placeholder) come from the model config or the processor as the layout says, and the token
layout itself is the layout's sequence kind (:mod:`vlpeft.tasks.sequences`).

The same object is the inference-side prompt encoder (:class:`vlpeft.tasks.inference.PromptEncoder`):
``encode_prompts`` returns exactly the prompt part of the training sequence, ``encode_target`` the target part
(with its end token) as tokenised after a prompt, and ``text_inputs`` pads (prompt, target) rows the way the
collator does, so ranking and generation see the layout the model was trained on.

Padding is on the right, with ``attention_mask`` 0 and ``labels`` -100. ``max_length`` bounds the number of
*text* tokens of a sequence (image placeholder tokens are not counted): when a sequence is longer, tokens are
removed from the end of the prompt first, then from the end of the target (its end token is kept); every
truncated sequence is counted in ``encoder.num_truncated``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlpeft.tasks.layouts import InputLayout, families_where, layout_for
from vlpeft.tasks.sequences import SEQUENCE_KINDS, Roles

__all__ = ["GENERATIVE_FAMILIES", "SequenceEncoder", "item_pixel_inputs", "pixel_inputs", "processor_parts"]

#: Families with a generative sequence layout (the ``family`` values :class:`SequenceEncoder` accepts).
GENERATIVE_FAMILIES: tuple[str, ...] = families_where(lambda layout: layout.generative)


def processor_parts(processor: Any) -> tuple[Any, Any]:
    """``(tokenizer, image_processor)`` of a processor; ``TypeError`` when either is missing."""
    tokenizer = getattr(processor, "tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    if tokenizer is None or image_processor is None:
        raise TypeError(f"processor {type(processor).__name__} must have .tokenizer and .image_processor "
                        "(a transformers processor, or vlpeft.tasks.processors.ImageTextProcessor)")
    return tokenizer, image_processor


def _config_id(model_config: Any, *names: str) -> int | None:
    """First non-None id among ``names`` on ``model_config`` or its ``text_config``."""
    if model_config is None:
        return None
    for cfg in (getattr(model_config, "text_config", None), model_config):
        for name in names:
            value = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(value, int):
                return value
    return None


def pixel_inputs(image_processor: Any, images: Sequence[Any], index: Sequence[int] | None = None
                 ) -> dict[str, torch.Tensor]:
    """Run the image processor once per distinct image and repeat rows along ``index`` (batch dim 0)."""
    features = image_processor(images=list(images), return_tensors="pt")
    out: dict[str, torch.Tensor] = {}
    for key, value in features.items():
        if isinstance(value, torch.Tensor):
            out[key] = value if index is None else value.index_select(0, torch.as_tensor(index, dtype=torch.long))
    if "pixel_values" not in out:
        raise ValueError(f"{type(image_processor).__name__} returned no pixel_values")
    return out


def item_pixel_inputs(image_processor: Any, items: Sequence[Mapping[str, Any]], index: Sequence[int] | None = None
                      ) -> dict[str, torch.Tensor]:
    """Pixel inputs of task items, rows repeated along ``index`` (batch dim 0).

    One image per item (``item["image"]``): ``pixel_values`` (batch, 3, H, W). Several (``item["images"]``, NLVR2's
    pair, in order): (batch, n, 3, H, W), every image processed once; every item must have the same ``n``.
    """
    if not any("images" in item for item in items):
        return pixel_inputs(image_processor, [item["image"] for item in items], index)
    counts = sorted({len(item.get("images") or ()) for item in items})
    if len(counts) != 1 or counts[0] < 1:
        raise ValueError(f"every item of a batch needs the same number of images (item['images']), got counts {counts}")
    flat = [image for item in items for image in item["images"]]
    features = pixel_inputs(image_processor, flat)
    out = {}
    for key, value in features.items():
        grouped = value.reshape(len(items), counts[0], *value.shape[1:]) if value.shape[0] == len(flat) else value
        out[key] = grouped if index is None else grouped.index_select(0, torch.as_tensor(index, dtype=torch.long))
    return out


def _begin_end_ids(tok: Any, model_config: Any, layout: InputLayout) -> tuple[int | None, int | None]:
    """(begin id, end id): the config's ids (what ``generate`` uses), else the tokenizer's, as the layout says."""
    bos_id = _config_id(model_config, "bos_token_id")
    if layout.tokenizer_style == "cls_sep":
        if bos_id is None:
            bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        # [SEP] ends the sequence: BLIP's generate stops at sep_token_id; GIT's config names [SEP] as eos.
        eos_id = _config_id(model_config, "sep_token_id", "eos_token_id")
        if eos_id is None:
            eos_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    else:
        if bos_id is None:
            bos_id = tok.bos_token_id
        eos_id = _config_id(model_config, "eos_token_id")
        if eos_id is None:
            eos_id = tok.eos_token_id
    if layout.begin_token == "decoder_start":
        start = getattr(model_config, "decoder_start_token_id", None) if model_config is not None else None
        bos_id = start if start is not None else bos_id
    if layout.begin_token == "none":
        bos_id = None  # e.g. the released ViT + GPT-2 captions start right after the visual prefix
    if eos_id is None or (bos_id is None and layout.begin_token in ("required", "decoder_start")):
        raise ValueError(f"cannot determine begin/end token ids for family {layout.family!r}")
    return bos_id, eos_id


class SequenceEncoder:
    """Build (prompt, target) token sequences for one model family, laid out as its
    :class:`~vlpeft.tasks.layouts.InputLayout` says (sequence kinds: :mod:`vlpeft.tasks.layouts`).

    Args:
        processor: the model's processor (``AutoProcessor.from_pretrained(name)`` or
            :func:`~vlpeft.tasks.processors.build_tiny_processor`); its tokenizer must be a fast tokenizer.
        family: one of :data:`GENERATIVE_FAMILIES`.
        max_length: maximum number of text tokens per sequence.
        model_config: optional model config; when given, begin/end/image ids and the query-token count come
            from it (what ``generate`` uses), else from the processor/tokenizer.
        llava_template: conversation template with ``<image>`` and ``{prompt}`` for ``chat`` layouts (default:
            the layout's ``prompt_template``).
    """

    def __init__(self, processor: Any, family: str, max_length: int, model_config: Any = None,
                 llava_template: str | None = None) -> None:
        if family not in GENERATIVE_FAMILIES:
            raise ValueError(f"unknown generative family {family!r}; expected one of {GENERATIVE_FAMILIES}")
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3, got {max_length}")
        self.layout = layout = layout_for(family)
        self.processor = processor
        self.tokenizer, self.image_processor = processor_parts(processor)
        if not getattr(self.tokenizer, "is_fast", False):
            raise TypeError("the collators need a fast tokenizer (offset mapping); load the processor with "
                            "use_fast=True")
        self.family = family
        self.max_length = max_length
        self.num_truncated = 0
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else _config_id(model_config, "pad_token_id")
        if self.pad_id is None and layout.pad_falls_back_to_eos:
            self.pad_id = tok.eos_token_id  # padded positions are masked anyway
        if self.pad_id is None:
            raise ValueError("the tokenizer has no pad token and the model config no pad_token_id")
        self.bos_id, self.eos_id = _begin_end_ids(tok, model_config, layout)
        self.image_token_id: int | None = None
        self.num_query_tokens = 0
        self.chat_template = llava_template if llava_template is not None else layout.prompt_template
        if layout.image_placeholders is not None:
            self.image_token_id = _config_id(model_config, "image_token_index", "image_token_id")
            if self.image_token_id is None:
                self.image_token_id = getattr(processor, "image_token_id", None)
            if self.image_token_id is None:
                self.image_token_id = tok.convert_tokens_to_ids(str(getattr(processor, "image_token", "<image>")))
        if layout.image_placeholders == "query_tokens":
            n = getattr(model_config, "num_query_tokens", None) if model_config is not None else None
            self.num_query_tokens = n if n is not None else getattr(processor, "num_query_tokens", None)
            if not self.num_query_tokens:
                raise ValueError(f"family {family!r} needs num_query_tokens (processor.num_query_tokens or model "
                                 "config)")
        self.sequence = SEQUENCE_KINDS[layout.sequence](self)

    # ----------------------------------------------------------------------------------------------- counts
    def num_image_tokens(self, pixel_values: torch.Tensor | None = None) -> int:
        """Placeholder tokens one image occupies in ``input_ids`` (0 without image placeholders);
        ``pixel_values`` (batch, 3, H, W) is needed where the count follows the image size (``patch_grid``)."""
        kind = self.layout.image_placeholders
        if kind == "query_tokens":
            return int(self.num_query_tokens)
        if kind == "image_seq_length":
            return int(self.processor.image_seq_length)
        if kind == "patch_grid":
            if pixel_values is None:
                raise ValueError(f"family {self.family!r}: the image-token count needs the pixel values")
            p = self.processor
            height, width = pixel_values.shape[-2:]
            n = (height // p.patch_size) * (width // p.patch_size) + (p.num_additional_image_tokens or 0)
            return n - 1 if p.vision_feature_select_strategy == "default" else n
        return 0

    # --------------------------------------------------------------------------------- shared token machinery
    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of ``text`` without special tokens."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def text_roles(self, text: str, prompt_span: tuple[int, int], target_start: int) -> Roles:
        """Tokenize ``text`` jointly; role of each token: "target" (starts at/after ``target_start`` or
        crosses it), "prompt" (inside ``prompt_span``), else "template"."""
        ids, offsets = self.tokenize(text)
        roles = []
        for start, end in offsets:
            if end > target_start and end > start:
                roles.append("target")
            elif prompt_span[0] <= start and end <= prompt_span[1] and end > start:
                roles.append("prompt")
            else:
                roles.append("template")
        return ids, roles

    def truncate(self, ids: list[int], roles: list[str]) -> Roles:
        """Drop prompt tokens from the end, then target tokens (not the end token), to ``max_length`` text
        tokens; counts the sequence in ``num_truncated`` when anything is dropped."""
        excess = sum(r != "image" for r in roles) - self.max_length
        if excess <= 0:
            return ids, roles
        self.num_truncated += 1
        drop: set[int] = set()
        for role in ("prompt", "target"):
            positions = [i for i, r in enumerate(roles) if r == role]
            if role == "target":
                positions = positions[:-1]  # keep the end token
            for i in reversed(positions):
                if excess == 0:
                    break
                drop.add(i)
                excess -= 1
        if excess > 0:
            raise ValueError(f"max_length={self.max_length} is too small for the fixed template tokens of family "
                             f"{self.family!r}")
        keep = [i for i in range(len(ids)) if i not in drop]
        return [ids[i] for i in keep], [roles[i] for i in keep]

    def pad(self, rows: list[Roles]) -> dict[str, torch.Tensor]:
        """Right-pad ``(ids, roles)`` rows into ``input_ids`` / ``attention_mask`` / ``labels`` (rows, length),
        plus ``token_type_ids`` (1 on the target) where the layout needs them."""
        length = max(len(ids) for ids, _ in rows)
        n = len(rows)
        input_ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        token_type = torch.zeros((n, length), dtype=torch.long)
        for row, (ids, roles) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            target = torch.tensor([r == "target" for r in roles])
            labels[row, : len(ids)] = torch.where(target, torch.tensor(ids), torch.tensor(-100))
            token_type[row, : len(ids)] = target.long()
        out = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        if self.layout.token_type_ids:
            out["token_type_ids"] = token_type
        return out

    # ------------------------------------------------------------------------------ inference (prompt encoder)
    @property
    def pad_token_id(self) -> int:
        return int(self.pad_id)

    @property
    def supports_ranking(self) -> bool:
        """Whether candidates can be scored as ``prompt + target`` in ``input_ids`` (decoder-only layouts)."""
        return self.layout.ranks_candidates

    @property
    def prefix_predicts_first_token(self) -> bool:
        """Whether the model prepends visual positions whose last one predicts the first text token."""
        return self.layout.prefix_predicts_first_token

    def encode_prompts(self, items: Sequence[Mapping[str, Any]], prompts: Sequence[str]
                       ) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        """Inference inputs of ``items``: ``({"pixel_values": (batch, [n_images,] 3, H, W), ...}, prompt ids per
        item)`` (:func:`item_pixel_inputs`).

        The prompt ids are the training sequence up to the first target token (begin, image placeholder and
        template tokens included); for ``question_answer`` layouts, the question-encoder ids.
        """
        if len(items) != len(prompts):
            raise ValueError(f"{len(items)} items but {len(prompts)} prompts")
        extra = item_pixel_inputs(self.image_processor, items)
        return extra, self.sequence.prompt_ids(prompts, self.num_image_tokens(extra["pixel_values"]))

    def encode_target(self, text: str) -> list[int]:
        """Target ids as trained after a prompt, ending with the end token (for ranking candidates)."""
        return self.sequence.target_ids(text)

    def generation_ids(self, prompt_ids: list[int]) -> list[int]:
        """``input_ids`` for ``model.generate`` (the end id appended where ``generate`` drops the last id)."""
        if self.layout.generate_drops_last_prompt_id:
            return [*prompt_ids, self.eos_id]
        return list(prompt_ids)

    def strip_prompt(self, generated: Sequence[int], prompt_ids: Sequence[int]) -> list[int]:
        """The new tokens of one ``generate`` output row."""
        out = list(generated)
        if not self.layout.generate_returns_prompt:
            return out
        if out[: len(prompt_ids)] != list(prompt_ids):
            raise ValueError(f"generate() did not return the prompt of family {self.family!r} as expected")
        return out[len(prompt_ids):]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def text_inputs(self, prompt_rows: Sequence[Sequence[int]], target_rows: Sequence[Sequence[int]]
                    ) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` / ``attention_mask`` (rows, length) of ``prompt + target`` rows, padded
        exactly as in training (``token_type_ids`` too where the layout has them: 0 on the prompt, 1 on the
        target)."""
        if not self.supports_ranking:
            raise ValueError(f"family {self.family!r} does not lay out prompt + target in input_ids")
        rows = [([*p, *t], ["prompt"] * len(p) + ["target"] * len(t)) for p, t in zip(prompt_rows, target_rows)]
        batch = self.pad(rows)
        batch.pop("labels")
        return batch

    # ------------------------------------------------------------------------------------------- training
    def encode(self, prompts: Sequence[str], targets: Sequence[str], pixel_values: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """Model inputs (without pixel values) for ``len(prompts)`` sequences; ``pixel_values`` (S, 3, H, W).

        Returns ``input_ids``, ``attention_mask``, ``labels`` (sequences, length), plus ``token_type_ids`` where
        the layout needs them; ``question_answer`` layouts return the question in ``input_ids`` and the answer in
        ``decoder_input_ids`` / ``decoder_attention_mask`` / ``labels``; ``encoder_decoder`` layouts return
        ``decoder_input_ids`` / ``decoder_attention_mask`` / ``labels``.
        """
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        return self.sequence.encode(prompts, targets, pixel_values)
