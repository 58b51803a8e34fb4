"""Sequence kinds: how one (prompt, target) pair becomes token ids, one small class per
:attr:`InputLayout.sequence <vlpeft.tasks.layouts.InputLayout.sequence>` value (layouts tabulated in
:mod:`vlpeft.tasks.layouts`).

Each kind works for a :class:`~vlpeft.tasks.sequence_encoder.SequenceEncoder` (its special ids, tokenizer,
truncation and padding) and provides

- ``encode(prompts, targets, pixel_values)``: padded training inputs with ``labels`` (sequences, length);
- ``prompt_ids(prompts, n_image)``: per prompt, the ids the model sees before the target;
- ``target_ids(text)``: the target's ids as trained after a prompt, with the end token.

Token roles: "image" (placeholder), "special" (begin), "template", "prompt", "target" (labels only here).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vlpeft.tasks.sequence_encoder import SequenceEncoder

__all__ = [
    "SEQUENCE_KINDS",
    "CausalSequence",
    "ChatSequence",
    "EncoderDecoderSequence",
    "PrefixSuffixSequence",
    "QuestionAnswerSequence",
    "Seq2SeqSequence",
    "TokenSequence",
]

#: Token ids of one sequence and the role of each token.
Roles = tuple[list[int], list[str]]
#: Dummy prompt used to tokenise a target as it appears after a prompt (BPE tokenisers mark a leading space).
_TARGET_CONTEXT = "?"


class TokenSequence(ABC):
    """One sequence kind, bound to the encoder whose ids and tokenizer it uses."""

    def __init__(self, encoder: SequenceEncoder) -> None:
        self.enc = encoder

    @abstractmethod
    def encode(self, prompts: Sequence[str], targets: Sequence[str], pixel_values: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """Training inputs of ``len(prompts)`` sequences (see :meth:`SequenceEncoder.encode`)."""

    @abstractmethod
    def prompt_ids(self, prompts: Sequence[str], n_image: int) -> list[list[int]]:
        """Per prompt, the ids the model reads before the first target token (``n_image`` placeholders each)."""

    @abstractmethod
    def target_ids(self, text: str) -> list[int]:
        """``text`` as a target after a prompt, ending with the end token."""


class _RoleSequence(TokenSequence):
    """Kinds built as one token row with per-token roles: truncate, place the image tokens, pad."""

    @abstractmethod
    def roles(self, prompt: str, target: str) -> Roles:
        """Token ids and roles of one full sequence (target followed by the end token)."""

    def head(self) -> Roles:
        """Image placeholders (for layouts that have them) then the begin token (when there is one)."""
        enc = self.enc
        ids = [enc.image_token_id] * enc.num_image_tokens() if enc.layout.image_placeholders else []
        roles = ["image"] * len(ids)
        if enc.bos_id is not None:
            ids, roles = [*ids, enc.bos_id], [*roles, "special"]
        return ids, roles

    def place_images(self, ids: list[int], roles: list[str], n_image: int) -> Roles:
        """The row with ``n_image`` image tokens (these kinds build them at the head already: checked)."""
        n_found = roles.count("image")
        if n_found != n_image:
            raise AssertionError(f"expected {n_image} image tokens, built {n_found}")
        return ids, roles

    def rows(self, prompts: Sequence[str], targets: Sequence[str], n_image: int) -> list[Roles]:
        return [self.place_images(*self.enc.truncate(*self.roles(p, t)), n_image) for p, t in zip(prompts, targets)]

    def encode(self, prompts: Sequence[str], targets: Sequence[str], pixel_values: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        return self.enc.pad(self.rows(prompts, targets, self.enc.num_image_tokens(pixel_values)))

    def prompt_ids(self, prompts: Sequence[str], n_image: int) -> list[list[int]]:
        out = []
        for prompt in prompts:
            ids, roles = self.place_images(*self.roles(prompt, ""), n_image)
            out.append([i for i, r in zip(ids, roles) if r != "target"])
        return out

    def target_ids(self, text: str) -> list[int]:
        ids, roles = self.roles(_TARGET_CONTEXT, text)
        return [i for i, r in zip(ids, roles) if r == "target"]


class CausalSequence(_RoleSequence):
    """``[image]*n [begin] prompt target [end]`` in ``input_ids``, prompt and target tokenized together."""

    def roles(self, prompt: str, target: str) -> Roles:
        text = f"{prompt} {target}" if prompt else target
        ids, roles = self.enc.text_roles(text, (0, len(prompt)), len(text) - len(target))
        head_ids, head_roles = self.head()
        return head_ids + ids + [self.enc.eos_id], head_roles + roles + ["target"]


class ChatSequence(_RoleSequence):
    """``[begin]`` + the conversation template around the prompt (one ``<image>``, expanded to the image's
    placeholder count), then `` target [end]``."""

    def __init__(self, encoder: SequenceEncoder) -> None:
        super().__init__(encoder)
        template = encoder.chat_template
        if template is None or "<image>" not in template or "{prompt}" not in template:
            raise ValueError(f"llava_template must contain '<image>' and '{{prompt}}', got {template!r}")

    def roles(self, prompt: str, target: str) -> Roles:
        enc = self.enc
        before, after = enc.chat_template.split("{prompt}", 1)
        prefix = before + prompt + after
        text = prefix + " " + target
        ids, roles = enc.text_roles(text, (len(before), len(before) + len(prompt)), len(prefix) + 1)
        roles = ["image" if i == enc.image_token_id else r for i, r in zip(ids, roles)]
        head_ids = [enc.bos_id] if enc.bos_id is not None else []
        return head_ids + ids + [enc.eos_id], ["special"] * len(head_ids) + roles + ["target"]

    def place_images(self, ids: list[int], roles: list[str], n_image: int) -> Roles:
        """Expand the template's one image placeholder to ``n_image`` tokens."""
        if roles.count("image") != 1:
            raise ValueError(f"the LLaVA template must hold exactly one image placeholder, found {roles.count('image')}")
        at = roles.index("image")
        image = [self.enc.image_token_id] * n_image
        return ids[:at] + image + ids[at + 1:], roles[:at] + ["image"] * n_image + roles[at + 1:]


class PrefixSuffixSequence(_RoleSequence):
    """``[image]*n [begin] prompt "\\n"`` (prefix), then the target tokenized on its own and ``[end]``."""

    def roles(self, prompt: str, target: str) -> Roles:
        enc = self.enc
        prefix = prompt + "\n"
        p_ids, p_roles = enc.text_roles(prefix, (0, len(prompt)), len(prefix) + 1)
        t_ids, _ = enc.tokenize(target)
        head_ids, head_roles = self.head()
        return head_ids + p_ids + t_ids + [enc.eos_id], head_roles + p_roles + ["target"] * (len(t_ids) + 1)


class EncoderDecoderSequence(CausalSequence):
    """The causal row ``[start] prompt target [end]`` fed to the decoder shifted: ``decoder_input_ids`` all but
    the last token, ``labels`` the next tokens on the target (no shift inside the model)."""

    def encode(self, prompts: Sequence[str], targets: Sequence[str], pixel_values: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        rows = self.rows(prompts, targets, self.enc.num_image_tokens(pixel_values))
        shifted = [(ids[:-1], ids[1:], roles[1:]) for ids, roles in rows]
        length = max(len(d) for d, _, _ in shifted)
        n = len(rows)
        dec = torch.full((n, length), self.enc.pad_id, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        for row, (d, t, roles) in enumerate(shifted):
            dec[row, : len(d)] = torch.tensor(d)
            mask[row, : len(d)] = 1
            labels[row, : len(t)] = torch.tensor([tid if r == "target" else -100 for tid, r in zip(t, roles)])
        return {"decoder_input_ids": dec, "decoder_attention_mask": mask, "labels": labels}

    def prompt_ids(self, prompts: Sequence[str], n_image: int) -> list[list[int]]:
        raise ValueError(f"inference with a prompt encoder is not available for {self.enc.family} models")


class QuestionAnswerSequence(TokenSequence):
    """Question through the text encoder (``input_ids`` with the tokenizer's special tokens), answer
    ``[begin] target [end]`` in ``decoder_input_ids``."""

    def encode(self, prompts: Sequence[str], targets: Sequence[str], pixel_values: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        enc = self.enc
        question_budget = enc.max_length
        full = enc.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        if any(len(ids) > question_budget for ids in full):
            enc.num_truncated += sum(len(ids) > question_budget for ids in full)
        questions = enc.tokenizer(list(prompts), add_special_tokens=True, padding=True, truncation=True,
                                  max_length=question_budget, return_tensors="pt")
        answers = []
        for target in targets:
            ids, _ = enc.tokenize(target)
            if len(ids) + 2 > enc.max_length:
                enc.num_truncated += 1
                ids = ids[: enc.max_length - 2]
            answers.append([enc.bos_id, *ids, enc.eos_id])
        length = max(len(a) for a in answers)
        dec = torch.full((len(answers), length), enc.pad_id, dtype=torch.long)
        mask = torch.zeros_like(dec)
        for row, a in enumerate(answers):
            dec[row, : len(a)] = torch.tensor(a)
            mask[row, : len(a)] = 1
        labels = dec.masked_fill(mask == 0, -100)
        labels[:, 0] = -100  # the begin token is never predicted
        return {"input_ids": questions["input_ids"], "attention_mask": questions["attention_mask"],
                "decoder_input_ids": dec, "decoder_attention_mask": mask, "labels": labels}

    def prompt_ids(self, prompts: Sequence[str], n_image: int) -> list[list[int]]:
        return [list(ids) for ids in self.enc.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]

    def target_ids(self, text: str) -> list[int]:
        ids, _ = self.enc.tokenize(text)
        return [*ids, self.enc.eos_id]


class Seq2SeqSequence(TokenSequence):
    """Prompt through the encoder, target through the decoder (VL-T5 / VL-Adapter's BART inputs).

    ``input_ids`` = tokenizer(prompt) with the tokenizer's special tokens (BART: ``<s> prompt </s>``; the model
    appends its visual tokens after them); the decoder row is ``[start]`` + tokenizer(target) with its special
    tokens (BART: ``</s> <s> target </s>``, VL-T5's labels ``<s> target </s>`` shifted right by the decoder start).
    ``labels`` hold the row's ids after ``[start]`` and -100 on ``[start]`` and padding, aligned with
    ``decoder_input_ids`` as in causal rows: the objective scores position t's logits against label t + 1 (the
    row's last id, the end token, is fed but predicts nothing). Text beyond ``max_length`` is cut from the end of
    the prompt / target; the end token is kept.
    """

    def _prompt_rows(self, prompts: Sequence[str], count: bool = True) -> list[list[int]]:
        """Encoder ids per prompt, cut as in training (``count``: add the cut ones to ``num_truncated``)."""
        enc = self.enc
        rows = enc.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        out = []
        for ids in rows:
            if len(ids) > enc.max_length:
                enc.num_truncated += int(count)
                ids = [*ids[: enc.max_length - 1], ids[-1]]  # keep the tokenizer's end token
            out.append(list(ids))
        return out

    def _target_row(self, text: str) -> list[int]:
        enc = self.enc
        ids = list(enc.tokenizer(text, add_special_tokens=True)["input_ids"])
        if not ids or ids[-1] != enc.eos_id:
            ids.append(enc.eos_id)
        if len(ids) > enc.max_length:
            enc.num_truncated += 1
            ids = [*ids[: enc.max_length - 1], ids[-1]]
        return ids

    def encode(self, prompts: Sequence[str], targets: Sequence[str], pixel_values: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        enc = self.enc
        prompt_rows = self._prompt_rows(prompts)
        decoder_rows = [[enc.bos_id, *self._target_row(t)] for t in targets]
        n = len(prompt_rows)
        width = max(len(r) for r in prompt_rows)
        input_ids = torch.full((n, width), enc.pad_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        length = max(len(r) for r in decoder_rows)
        dec = torch.full((n, length), enc.pad_id, dtype=torch.long)
        dec_mask = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        for row, (p, d) in enumerate(zip(prompt_rows, decoder_rows, strict=True)):
            input_ids[row, : len(p)] = torch.tensor(p)
            attention[row, : len(p)] = 1
            dec[row, : len(d)] = torch.tensor(d)
            dec_mask[row, : len(d)] = 1
            labels[row, 1 : len(d)] = torch.tensor(d[1:])
        return {"input_ids": input_ids, "attention_mask": attention, "decoder_input_ids": dec,
                "decoder_attention_mask": dec_mask, "labels": labels}

    def prompt_ids(self, prompts: Sequence[str], n_image: int) -> list[list[int]]:
        return self._prompt_rows(prompts, count=False)

    def target_ids(self, text: str) -> list[int]:
        return self._target_row(text)


#: The class of each ``InputLayout.sequence`` kind.
SEQUENCE_KINDS: dict[str, type[TokenSequence]] = {
    "causal": CausalSequence,
    "chat": ChatSequence,
    "prefix_suffix": PrefixSuffixSequence,
    "encoder_decoder": EncoderDecoderSequence,
    "question_answer": QuestionAnswerSequence,
    "seq2seq": Seq2SeqSequence,
}
