"""A tiny model together with the inputs that fit it (:class:`TinyModel`, built by
:func:`vlpeft.models.tiny.build_tiny_model`): valid forward, training and ``generate()`` inputs for every input
layout of the tiny families."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlpeft.models.tiny.images import random_pixel_values
from vlpeft.models.tiny.tokens import BOS_TOKEN_ID, EOS_TOKEN_ID, FIRST_TEXT_TOKEN_ID, PAD_TOKEN_ID

__all__ = ["TinyModel"]


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
        token_type_ids: whether the model takes ``token_type_ids`` marking the suffix (answer) tokens (PaliGemma's
            prefix-LM mask); set by the family's recipe.
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
    token_type_ids: bool = False
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
            if self.token_type_ids:
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
        if self.token_type_ids:
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
