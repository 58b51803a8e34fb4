"""Collators: dataset items -> model inputs, per model family, using the model's processor.

Generative framing (one token sequence per training example, loss only on the target):

==========================  ===================================================================================
family                      sequence layout (``labels`` = ids on target tokens and the end token, else -100)
==========================  ===================================================================================
``blip_caption``, ``git``   ``[bos] prompt target [eos]`` in ``input_ids`` (BLIP text decoder / GIT)
``blip_vqa``                ``input_ids`` = tokenizer(prompt) for the question encoder;
                            ``decoder_input_ids`` = ``[bos] target [eos]`` (BlipForQuestionAnswering)
``blip2``                   ``[image]*num_query_tokens [bos] prompt target [eos]``
``llava``                   template (default ``"USER: <image>\\n{prompt} ASSISTANT:"``) with ``<image>``
                            expanded to the processor's count, then `` target [eos]``
``paligemma``               ``[image]*image_seq_length [bos] prompt "\\n"`` then target tokenized separately,
                            ``[eos]``; ``token_type_ids`` 0 on the prefix, 1 on target + eos
``vision_encoder_decoder``  ``decoder_input_ids`` = ``[start] prompt target``; ``labels`` aligned to predict
                            ``prompt target [eos]`` (no shift inside the model), prompt masked
``vit_gpt2``                ``prompt target [eos]`` (GPT-2 style, no begin token); the vlpeft composite prepends
                            its visual prefix, whose last position predicts the first text token
==========================  ===================================================================================

The same :class:`SequenceEncoder` is the inference-side prompt encoder (:class:`vlpeft.tasks.inference.PromptEncoder`):
``encode_prompts`` returns exactly the prompt part of the training sequence, ``encode_target`` the target part
(with its end token) as tokenised after a prompt, and ``text_inputs`` pads (prompt, target) rows the way the
collator does, so ranking and generation see the layout the model was trained on.

Padding is on the right, with ``attention_mask`` 0 and ``labels`` -100. ``max_length`` bounds the number of
*text* tokens of a sequence (image placeholder tokens are not counted): when a sequence is longer, tokens are
removed from the end of the prompt first, then from the end of the target (its end token is kept); every
truncated sequence is counted in ``collator.num_truncated``.

Discriminative framing: :class:`VQAClassificationCollator` (soft-score targets over an answer vocabulary) and
:class:`EntailmentClassificationCollator` (3-way label ids).

Images: items carry PIL images; ``processor.image_processor`` turns them into ``pixel_values``
(batch, 3, H, W). Generative VQA repeats an item's image for each of its answer sequences.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlpeft.tasks.framing import (
    DEFAULT_CAPTION_PROMPT,
    DEFAULT_ENTAILMENT_PROMPT,
    DEFAULT_LABEL_WORDS,
    DEFAULT_VQA_PROMPT,
    AnswerWeighting,
    TextExample,
    clean_hypothesis,
    format_prompt,
    vqa_targets,
)
from vlpeft.tasks.snli_ve import SNLI_VE_LABEL2ID, SNLI_VE_LABELS
from vlpeft.tasks.vqa import AnswerNormalizer, AnswerVocab, basic_answer_normalizer

GENERATIVE_FAMILIES: tuple[str, ...] = (
    "blip_caption", "git", "blip_vqa", "blip2", "llava", "paligemma", "vision_encoder_decoder", "vit_gpt2",
)
#: Families whose text is one causal sequence (prompt then target in ``input_ids``): these support ranking by
#: sequence likelihood. ``blip_vqa`` and ``vision_encoder_decoder`` put the target in ``decoder_input_ids``.
DECODER_ONLY_FAMILIES: tuple[str, ...] = ("blip_caption", "git", "blip2", "llava", "paligemma", "vit_gpt2")
#: Families whose ``generate`` returns only new tokens (the prompt is not echoed).
_GENERATE_RETURNS_NEW_ONLY: tuple[str, ...] = ("vit_gpt2", "blip_vqa", "vision_encoder_decoder")
#: Families whose visual prefix precedes the text inside the model: the prefix's last position predicts the
#: first text token, so an empty prompt still trains (and scores) every target token.
PREFIX_FAMILIES: tuple[str, ...] = ("vit_gpt2",)
#: Dummy prompt used to tokenise a target as it appears after a prompt (BPE tokenisers mark a leading space).
_TARGET_CONTEXT = "?"
DEFAULT_LLAVA_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
#: Keys of generative VQA batches that are not model inputs (pop them before ``model(**batch)``).
SEQUENCE_INFO_KEYS: tuple[str, ...] = ("sequence_weights", "sequence_item_index")


def split_model_inputs(batch: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_inputs, sequence_info)``: separate :data:`SEQUENCE_INFO_KEYS` from the model inputs."""
    model_inputs = {k: v for k, v in batch.items() if k not in SEQUENCE_INFO_KEYS}
    info = {k: v for k, v in batch.items() if k in SEQUENCE_INFO_KEYS}
    return model_inputs, info


def _parts(processor: Any) -> tuple[Any, Any]:
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


@dataclass
class _Encoded:
    """One sequence before padding: ids, per-token role, and (encoder-style families) extra parts."""

    ids: list[int]
    is_target: list[bool]
    is_image: list[bool]


class SequenceEncoder:
    """Build (prompt, target) token sequences for one model family; see the module docstring for layouts.

    Args:
        processor: the model's processor (``AutoProcessor.from_pretrained(name)`` or
            :func:`~vlpeft.tasks.processors.build_tiny_processor`); its tokenizer must be a fast tokenizer.
        family: one of :data:`GENERATIVE_FAMILIES`.
        max_length: maximum number of text tokens per sequence.
        model_config: optional model config; when given, begin/end/image ids and the BLIP-2 query count come
            from it (what ``generate`` uses), else from the processor/tokenizer.
        llava_template: LLaVA conversation template with ``<image>`` and ``{prompt}``.
    """

    def __init__(self, processor: Any, family: str, max_length: int, model_config: Any = None,
                 llava_template: str = DEFAULT_LLAVA_TEMPLATE) -> None:
        if family not in GENERATIVE_FAMILIES:
            raise ValueError(f"unknown generative family {family!r}; expected one of {GENERATIVE_FAMILIES}")
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3, got {max_length}")
        self.processor = processor
        self.tokenizer, self.image_processor = _parts(processor)
        if not getattr(self.tokenizer, "is_fast", False):
            raise TypeError("the collators need a fast tokenizer (offset mapping); load the processor with "
                            "use_fast=True")
        self.family = family
        self.max_length = max_length
        self.num_truncated = 0
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else _config_id(model_config, "pad_token_id")
        if self.pad_id is None and family == "vit_gpt2":
            self.pad_id = tok.eos_token_id  # GPT-2 has no pad token; padded positions are masked anyway
        if self.pad_id is None:
            raise ValueError("the tokenizer has no pad token and the model config no pad_token_id")
        if family in ("blip_caption", "blip_vqa", "git"):
            self.bos_id = _config_id(model_config, "bos_token_id")
            if self.bos_id is None:
                self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
            # BLIP's generate stops at sep_token_id; GIT's config names [SEP] as eos.
            self.eos_id = _config_id(model_config, "sep_token_id", "eos_token_id")
            if self.eos_id is None:
                self.eos_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        else:
            self.bos_id = _config_id(model_config, "bos_token_id")
            if self.bos_id is None:
                self.bos_id = tok.bos_token_id
            self.eos_id = _config_id(model_config, "eos_token_id")
            if self.eos_id is None:
                self.eos_id = tok.eos_token_id
        if family == "vision_encoder_decoder":
            start = getattr(model_config, "decoder_start_token_id", None) if model_config is not None else None
            self.bos_id = start if start is not None else self.bos_id
        if family == "vit_gpt2":
            self.bos_id = None  # the released ViT + GPT-2 captions start right after the visual prefix
        if self.eos_id is None or (self.bos_id is None and family not in ("blip2", "llava", "paligemma", "vit_gpt2")):
            raise ValueError(f"cannot determine begin/end token ids for family {family!r}")
        self.image_token_id: int | None = None
        self.num_query_tokens = 0
        self.llava_template = llava_template
        if family in ("blip2", "llava", "paligemma"):
            self.image_token_id = _config_id(model_config, "image_token_index", "image_token_id")
            if self.image_token_id is None:
                self.image_token_id = getattr(processor, "image_token_id", None)
            if self.image_token_id is None:
                self.image_token_id = tok.convert_tokens_to_ids(str(getattr(processor, "image_token", "<image>")))
        if family == "blip2":
            n = getattr(model_config, "num_query_tokens", None) if model_config is not None else None
            self.num_query_tokens = n if n is not None else getattr(processor, "num_query_tokens", None)
            if not self.num_query_tokens:
                raise ValueError("BLIP-2 needs num_query_tokens (processor.num_query_tokens or model config)")
        if family == "llava" and ("<image>" not in llava_template or "{prompt}" not in llava_template):
            raise ValueError(f"llava_template must contain '<image>' and '{{prompt}}', got {llava_template!r}")

    # ----------------------------------------------------------------------------------------------- counts
    def num_image_tokens(self, pixel_values: torch.Tensor) -> int:
        """Placeholder tokens one image occupies in ``input_ids`` (0 for cross-attention families)."""
        if self.family == "blip2":
            return int(self.num_query_tokens)
        if self.family == "paligemma":
            return int(self.processor.image_seq_length)
        if self.family == "llava":
            p = self.processor
            height, width = pixel_values.shape[-2:]
            n = (height // p.patch_size) * (width // p.patch_size) + (p.num_additional_image_tokens or 0)
            return n - 1 if p.vision_feature_select_strategy == "default" else n
        return 0

    # --------------------------------------------------------------------------------------------- encoding
    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _text_roles(self, text: str, prompt_span: tuple[int, int], target_start: int
                    ) -> tuple[list[int], list[str]]:
        """Tokenize ``text`` jointly; role of each token: "target" (starts at/after ``target_start`` or
        crosses it), "prompt" (inside ``prompt_span``), else "template"."""
        ids, offsets = self._tokenize(text)
        roles = []
        for start, end in offsets:
            if end > target_start and end > start:
                roles.append("target")
            elif prompt_span[0] <= start and end <= prompt_span[1] and end > start:
                roles.append("prompt")
            else:
                roles.append("template")
        return ids, roles

    def _roles(self, prompt: str, target: str) -> tuple[list[int], list[str]]:
        """Token ids and roles ("image", "special", "template", "prompt", "target") of one full sequence."""
        fam = self.family
        if fam in ("blip_caption", "git", "vision_encoder_decoder", "blip2", "vit_gpt2"):
            text = f"{prompt} {target}" if prompt else target
            ids, roles = self._text_roles(text, (0, len(prompt)), len(text) - len(target))
            head: list[tuple[int, str]] = []
            if fam == "blip2":
                head = [(self.image_token_id, "image")] * self.num_query_tokens
            if self.bos_id is not None:
                head.append((self.bos_id, "special"))
            return [i for i, _ in head] + ids + [self.eos_id], [r for _, r in head] + roles + ["target"]
        if fam == "llava":
            before, after = self.llava_template.split("{prompt}", 1)
            prefix = before + prompt + after
            text = prefix + " " + target
            ids, roles = self._text_roles(text, (len(before), len(before) + len(prompt)), len(prefix) + 1)
            roles = ["image" if i == self.image_token_id else r for i, r in zip(ids, roles)]
            head_ids = [self.bos_id] if self.bos_id is not None else []
            return head_ids + ids + [self.eos_id], ["special"] * len(head_ids) + roles + ["target"]
        if fam == "paligemma":
            prefix = prompt + "\n"
            p_ids, p_roles = self._text_roles(prefix, (0, len(prompt)), len(prefix) + 1)
            t_ids, _ = self._tokenize(target)
            head_ids = [self.image_token_id] * int(self.processor.image_seq_length)
            head_roles = ["image"] * len(head_ids)
            if self.bos_id is not None:
                head_ids, head_roles = head_ids + [self.bos_id], head_roles + ["special"]
            return (head_ids + p_ids + t_ids + [self.eos_id],
                    head_roles + p_roles + ["target"] * (len(t_ids) + 1))
        raise AssertionError(fam)

    def _truncate(self, ids: list[int], roles: list[str]) -> tuple[list[int], list[str]]:
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

    # ------------------------------------------------------------------------------ inference (prompt encoder)
    @property
    def pad_token_id(self) -> int:
        return int(self.pad_id)

    @property
    def supports_ranking(self) -> bool:
        """Whether candidates can be scored as ``prompt + target`` in ``input_ids`` (decoder-only layouts)."""
        return self.family in DECODER_ONLY_FAMILIES

    @property
    def prefix_predicts_first_token(self) -> bool:
        """Whether the model prepends visual positions whose last one predicts the first text token."""
        return self.family in PREFIX_FAMILIES

    def _prompt_row(self, prompt: str, n_image: int) -> list[int]:
        ids, roles = self._roles(prompt, "")
        if self.family == "llava":
            ids, roles = _expand_image_tokens(ids, roles, self.image_token_id, n_image)
        return [i for i, r in zip(ids, roles) if r != "target"]

    def encode_prompts(self, items: Sequence[Mapping[str, Any]], prompts: Sequence[str]
                       ) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        """Inference inputs of ``items``: ``({"pixel_values": (batch, 3, H, W), ...}, prompt ids per item)``.

        The prompt ids are the training sequence up to the first target token (begin, image placeholder and
        template tokens included). For ``blip_vqa`` they are the question-encoder ids.
        """
        if len(items) != len(prompts):
            raise ValueError(f"{len(items)} items but {len(prompts)} prompts")
        extra = pixel_inputs(self.image_processor, [it["image"] for it in items])
        if self.family == "blip_vqa":
            return extra, [list(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
        if self.family == "vision_encoder_decoder":
            raise ValueError("inference with a prompt encoder is not available for vision_encoder_decoder models")
        n_image = self.num_image_tokens(extra["pixel_values"])
        return extra, [self._prompt_row(p, n_image) for p in prompts]

    def encode_target(self, text: str) -> list[int]:
        """Target ids as trained after a prompt, ending with the end token (for ranking candidates)."""
        if self.family == "blip_vqa":
            ids, _ = self._tokenize(text)
            return [*ids, self.eos_id]
        ids, roles = self._roles(_TARGET_CONTEXT, text)
        return [i for i, r in zip(ids, roles) if r == "target"]

    def generation_ids(self, prompt_ids: list[int]) -> list[int]:
        """``input_ids`` for ``model.generate`` (BLIP's caption ``generate`` drops the last id, so it gets the
        end token appended)."""
        if self.family == "blip_caption":
            return [*prompt_ids, self.eos_id]
        return list(prompt_ids)

    def strip_prompt(self, generated: Sequence[int], prompt_ids: Sequence[int]) -> list[int]:
        """The new tokens of one ``generate`` output row."""
        out = list(generated)
        if self.family in _GENERATE_RETURNS_NEW_ONLY:
            return out
        if out[: len(prompt_ids)] != list(prompt_ids):
            raise ValueError(f"generate() did not return the prompt of family {self.family!r} as expected")
        return out[len(prompt_ids):]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def text_inputs(self, prompt_rows: Sequence[Sequence[int]], target_rows: Sequence[Sequence[int]]
                    ) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` / ``attention_mask`` (rows, length) of ``prompt + target`` rows, padded
        exactly as in training (PaliGemma also gets ``token_type_ids``: 0 on the prompt, 1 on the target)."""
        if not self.supports_ranking:
            raise ValueError(f"family {self.family!r} does not lay out prompt + target in input_ids")
        rows = [([*p, *t], ["prompt"] * len(p) + ["target"] * len(t)) for p, t in zip(prompt_rows, target_rows)]
        batch = self._pad(rows)
        batch.pop("labels")
        return batch

    def encode(self, prompts: Sequence[str], targets: Sequence[str], pixel_values: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """Model inputs (without pixel values) for ``len(prompts)`` sequences.

        Returns ``input_ids``, ``attention_mask``, ``labels`` (sequences, length); PaliGemma adds
        ``token_type_ids``; ``blip_vqa`` returns the question in ``input_ids`` and the answer in
        ``decoder_input_ids`` / ``decoder_attention_mask`` / ``labels``; ``vision_encoder_decoder`` returns
        ``decoder_input_ids`` / ``decoder_attention_mask`` / ``labels``.
        """
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        if self.family == "blip_vqa":
            return self._encode_blip_vqa(prompts, targets)
        n_image = self.num_image_tokens(pixel_values)
        rows: list[tuple[list[int], list[str]]] = []
        for prompt, target in zip(prompts, targets):
            ids, roles = self._truncate(*self._roles(prompt, target))
            n_found = roles.count("image")
            if self.family == "llava":
                ids, roles = _expand_image_tokens(ids, roles, self.image_token_id, n_image)
            elif n_found != n_image:
                raise AssertionError(f"expected {n_image} image tokens, built {n_found}")
            rows.append((ids, roles))
        if self.family == "vision_encoder_decoder":
            return self._pad_encoder_decoder(rows)
        return self._pad(rows)

    def _pad(self, rows: list[tuple[list[int], list[str]]]) -> dict[str, torch.Tensor]:
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
        if self.family == "paligemma":
            out["token_type_ids"] = token_type
        return out

    def _pad_encoder_decoder(self, rows: list[tuple[list[int], list[str]]]) -> dict[str, torch.Tensor]:
        # rows are [start] prompt target [eos]; the decoder reads all but the last token and predicts the next.
        shifted = [(ids[:-1], ids[1:], roles[1:]) for ids, roles in rows]
        length = max(len(d) for d, _, _ in shifted)
        n = len(rows)
        dec = torch.full((n, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        for row, (d, t, roles) in enumerate(shifted):
            dec[row, : len(d)] = torch.tensor(d)
            mask[row, : len(d)] = 1
            labels[row, : len(t)] = torch.tensor([tid if r == "target" else -100 for tid, r in zip(t, roles)])
        return {"decoder_input_ids": dec, "decoder_attention_mask": mask, "labels": labels}

    def _encode_blip_vqa(self, prompts: Sequence[str], targets: Sequence[str]) -> dict[str, torch.Tensor]:
        question_budget = self.max_length
        full = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        if any(len(ids) > question_budget for ids in full):
            self.num_truncated += sum(len(ids) > question_budget for ids in full)
        enc = self.tokenizer(list(prompts), add_special_tokens=True, padding=True, truncation=True,
                             max_length=question_budget, return_tensors="pt")
        answers = []
        for target in targets:
            ids, _ = self._tokenize(target)
            if len(ids) + 2 > self.max_length:
                self.num_truncated += 1
                ids = ids[: self.max_length - 2]
            answers.append([self.bos_id, *ids, self.eos_id])
        length = max(len(a) for a in answers)
        dec = torch.full((len(answers), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(dec)
        for row, a in enumerate(answers):
            dec[row, : len(a)] = torch.tensor(a)
            mask[row, : len(a)] = 1
        labels = dec.masked_fill(mask == 0, -100)
        labels[:, 0] = -100  # the begin token is never predicted
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "decoder_input_ids": dec, "decoder_attention_mask": mask, "labels": labels}


def _expand_image_tokens(ids: list[int], roles: list[str], image_id: int | None, count: int
                         ) -> tuple[list[int], list[str]]:
    if roles.count("image") != 1:
        raise ValueError(f"the LLaVA template must hold exactly one image placeholder, found {roles.count('image')}")
    at = roles.index("image")
    return ids[:at] + [image_id] * count + ids[at + 1:], roles[:at] + ["image"] * count + roles[at + 1:]


class _GenerativeCollator(ABC):
    """Shared machinery: frame items into :class:`TextExample` s, encode, attach pixel values."""

    def __init__(self, processor: Any, family: str, max_length: int, model_config: Any,
                 llava_template: str) -> None:
        self.encoder = SequenceEncoder(processor, family, max_length, model_config, llava_template)

    @property
    def num_truncated(self) -> int:
        """Sequences truncated to ``max_length`` so far (exact count)."""
        return self.encoder.num_truncated

    @abstractmethod
    def examples(self, items: Sequence[Mapping[str, Any]]) -> list[TextExample]:
        """The training sequences of ``items`` (one or more per item)."""

    def _collate(self, items: Sequence[Mapping[str, Any]]) -> tuple[dict[str, torch.Tensor], list[TextExample]]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        examples = self.examples(items)
        index = [e.item_index for e in examples]
        pixels = pixel_inputs(self.encoder.image_processor, [it["image"] for it in items], index)
        batch = self.encoder.encode([e.prompt for e in examples], [e.target for e in examples],
                                    pixels["pixel_values"])
        batch.update(pixels)
        return batch, examples

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return self._collate(items)[0]


class VQAGenerativeCollator(_GenerativeCollator):
    """VQA as text generation ("question + answer", loss on the answer).

    Output: the family's inputs for S >= batch sequences (see :class:`SequenceEncoder`), ``pixel_values``
    (S, 3, H, W) with each item's image repeated per answer, plus ``sequence_weights`` (S,) float and
    ``sequence_item_index`` (S,) long (the item each sequence came from); pop those two with
    :func:`split_model_inputs` before ``model(**inputs)`` and weight per-sequence losses with them
    (:func:`vlpeft.tasks.losses.weighted_sequence_loss`).

    Args:
        answer_weighting: ``"release"`` (one sequence per distinct answer, weight count/len(answers); the BLIP /
            p-adapter release), ``"scores"`` (weight = soft score) or ``"most_common"`` (one sequence, weight 1).
        prompt_template: format string with ``{question}``.
        max_length: text-token limit (default 40, p-adapter.md §5.2).
    """

    def __init__(self, processor: Any, family: str, *, max_length: int = 40, answer_weighting: AnswerWeighting =
                 "release", prompt_template: str = DEFAULT_VQA_PROMPT, answer_normalizer: AnswerNormalizer =
                 basic_answer_normalizer, model_config: Any = None,
                 llava_template: str = DEFAULT_LLAVA_TEMPLATE) -> None:
        super().__init__(processor, family, max_length, model_config, llava_template)
        self.answer_weighting = answer_weighting
        self.prompt_template = prompt_template
        self.answer_normalizer = answer_normalizer
        format_prompt(prompt_template, question="")

    def examples(self, items: Sequence[Mapping[str, Any]]) -> list[TextExample]:
        out = []
        for i, item in enumerate(items):
            prompt = format_prompt(self.prompt_template, question=item["question"].strip())
            for answer, weight in vqa_targets(item, self.answer_weighting, self.answer_normalizer):
                out.append(TextExample(prompt, answer, weight, i))
        return out

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch, examples = self._collate(items)
        batch["sequence_weights"] = torch.tensor([e.weight for e in examples], dtype=torch.float32)
        batch["sequence_item_index"] = torch.tensor([e.item_index for e in examples], dtype=torch.long)
        return batch


class EntailmentGenerativeCollator(_GenerativeCollator):
    """SNLI-VE as text: prompt "Is it correct that <hypothesis>?" and target the label word
    (``Correct`` / ``Ambiguous`` / ``Incorrect`` by default). Output: the family's inputs and ``pixel_values``
    (batch, 3, H, W); one sequence per item. ``max_length`` defaults to 100 (p-adapter.md §5.2)."""

    def __init__(self, processor: Any, family: str, *, max_length: int = 100,
                 prompt_template: str = DEFAULT_ENTAILMENT_PROMPT,
                 label_words: Mapping[str, str] = DEFAULT_LABEL_WORDS, model_config: Any = None,
                 llava_template: str = DEFAULT_LLAVA_TEMPLATE) -> None:
        super().__init__(processor, family, max_length, model_config, llava_template)
        missing = set(SNLI_VE_LABELS) - set(label_words)
        if missing:
            raise ValueError(f"label_words lacks {sorted(missing)}; expected words for {SNLI_VE_LABELS}")
        self.label_words = dict(label_words)
        self.prompt_template = prompt_template
        format_prompt(prompt_template, hypothesis="")

    def examples(self, items: Sequence[Mapping[str, Any]]) -> list[TextExample]:
        out = []
        for i, item in enumerate(items):
            label = item["label"]
            if label not in self.label_words:
                raise ValueError(f"item {item.get('pair_id')!r}: label {label!r} has no label word "
                                 f"(known: {sorted(self.label_words)})")
            prompt = format_prompt(self.prompt_template, hypothesis=clean_hypothesis(item["hypothesis"]))
            out.append(TextExample(prompt, self.label_words[label], 1.0, i))
        return out


class CaptionGenerativeCollator(_GenerativeCollator):
    """Captioning: prompt (default "a picture of"; prompt tokens masked) followed by the caption.

    Use on the ``"pairs"`` view of :class:`~vlpeft.tasks.captions.CaptionDataset` (items with ``caption``).
    Output: the family's inputs and ``pixel_values`` (batch, 3, H, W). ``max_length`` defaults to 40.
    """

    def __init__(self, processor: Any, family: str, *, max_length: int = 40, prompt: str = DEFAULT_CAPTION_PROMPT,
                 caption_transform: Callable[[str], str] | None = None, model_config: Any = None,
                 llava_template: str = DEFAULT_LLAVA_TEMPLATE) -> None:
        super().__init__(processor, family, max_length, model_config, llava_template)
        self.prompt = prompt.strip()
        self.caption_transform = caption_transform

    def examples(self, items: Sequence[Mapping[str, Any]]) -> list[TextExample]:
        out = []
        for i, item in enumerate(items):
            if "caption" not in item:
                raise ValueError(f"item for image {item.get('image_id')!r} has no 'caption'; use the 'pairs' view "
                                 "of CaptionDataset for training")
            caption = item["caption"].strip()
            if self.caption_transform is not None:
                caption = self.caption_transform(caption)
            out.append(TextExample(self.prompt, caption, 1.0, i))
        return out


class _ClassificationCollator:
    def __init__(self, processor: Any, max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer, self.image_processor = _parts(processor)
        self.max_length = max_length
        self.num_truncated = 0

    def _encode(self, texts: list[str], images: list[Any]) -> dict[str, torch.Tensor]:
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        self.num_truncated += sum(n > self.max_length for n in lengths)
        enc = self.tokenizer(texts, add_special_tokens=True, padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        batch.update(pixel_inputs(self.image_processor, images))
        return batch


class VQAClassificationCollator(_ClassificationCollator):
    """VQA as classification over an answer vocabulary.

    Output: ``input_ids`` / ``attention_mask`` (batch, length) from the tokenizer with its special tokens
    (truncated to ``max_length``, default 40), ``pixel_values`` (batch, 3, H, W) and ``labels``
    (batch, num_answers) float32 soft scores (:meth:`AnswerVocab.soft_targets`; answers outside the vocabulary
    contribute nothing, as in VL-T5 / LXMERT).
    """

    def __init__(self, processor: Any, vocab: AnswerVocab, *, max_length: int = 40,
                 prompt_template: str = DEFAULT_VQA_PROMPT) -> None:
        super().__init__(processor, max_length)
        self.vocab = vocab
        self.prompt_template = prompt_template
        format_prompt(prompt_template, question="")

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        texts = [format_prompt(self.prompt_template, question=it["question"].strip()) for it in items]
        batch = self._encode(texts, [it["image"] for it in items])
        batch["labels"] = self.vocab.soft_targets([it.get("answer_scores") or {} for it in items])
        return batch


class EntailmentClassificationCollator(_ClassificationCollator):
    """SNLI-VE as 3-way classification: ``input_ids`` / ``attention_mask`` of the hypothesis (batch, length;
    ``max_length`` default 100), ``pixel_values`` (batch, 3, H, W), ``labels`` (batch,) long in
    :data:`~vlpeft.tasks.snli_ve.SNLI_VE_LABELS` order (entailment 0, neutral 1, contradiction 2)."""

    def __init__(self, processor: Any, *, max_length: int = 100) -> None:
        super().__init__(processor, max_length)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        labels = []
        for it in items:
            if it["label"] not in SNLI_VE_LABEL2ID:
                raise ValueError(f"item {it.get('pair_id')!r}: label {it['label']!r} not in {SNLI_VE_LABELS}")
            labels.append(SNLI_VE_LABEL2ID[it["label"]])
        batch = self._encode([it["hypothesis"].strip() for it in items], [it["image"] for it in items])
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch
