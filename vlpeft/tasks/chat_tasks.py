"""The papers' tasks (VQA, SNLI-VE, captions) and conversation data through a model's chat template.

For a model driven by its processor's chat template there is no per-family prompt code: each example is a
single-turn conversation (:func:`~vlpeft.tasks.chat_records.single_turn_record`: the user turn holds the image
and the task prompt, the assistant turn the target), rendered and labelled by
:class:`~vlpeft.tasks.chat_collator.ChatCollator` (loss on assistant tokens only). Inference renders the same
conversation without the assistant turn (``add_generation_prompt=True``):

- :func:`chat_generate` decodes what the model writes after that prompt;
- :func:`chat_rank` scores candidate answers as the assistant turn (summed log-likelihood of the assistant
  tokens, the end-of-turn token included), after a first-token pre-selection of ``top_k`` candidates.

So training, generation and ranking see exactly one rendering.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vlpeft.tasks.chat_collator import ChatCollator
from vlpeft.tasks.chat_records import ChatRecord, single_turn_record
from vlpeft.tasks.framing import TextExample

__all__ = [
    "ChatTaskCollator",
    "chat_generate",
    "chat_rank",
    "conversation_losses",
    "item_images",
    "prompt_records",
]


class ChatTaskCollator:
    """A task's framing (``examples(items) -> [TextExample]``) rendered as single-turn conversations.

    Output: the :class:`ChatCollator` batch (``input_ids`` / ``attention_mask`` / ``labels`` (S, L) and the image
    tensors) of the S >= batch training sequences; with ``weighted`` also ``sequence_weights`` (S,) and
    ``sequence_item_index`` (S,), as the release VQA objective needs.
    """

    def __init__(self, chat: ChatCollator, examples: Callable[[Sequence[Mapping[str, Any]]], list[TextExample]],
                 *, weighted: bool = False) -> None:
        self.chat = chat
        self.examples = examples
        self.weighted = weighted

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        examples = self.examples(items)
        records = [single_turn_record(item_images(items[e.item_index]), e.prompt, e.target, record_id=str(i))
                   for i, e in enumerate(examples)]
        batch = dict(self.chat(records))
        if self.weighted:
            if batch["input_ids"].shape[0] != len(examples):
                raise ValueError("a weighted VQA batch cannot drop sequences as bad input; fix or remove the records")
            batch["sequence_weights"] = torch.tensor([e.weight for e in examples], dtype=torch.float32)
            batch["sequence_item_index"] = torch.tensor([e.item_index for e in examples], dtype=torch.long)
        return batch


def item_images(item: Mapping[str, Any]) -> list[Any]:
    """A task item's images for its user turn: ``item["images"]`` when it has several (NLVR2's image pair, in
    order), else ``[item["image"]]``."""
    images = item.get("images")
    return list(images) if images is not None else [item["image"]]


def prompt_records(items: Sequence[Mapping[str, Any]], prompts: Sequence[str]) -> list[ChatRecord]:
    """Inference records: each item's image and its task prompt, no assistant turn."""
    return [single_turn_record(item_images(item), prompt, record_id=str(i))
            for i, (item, prompt) in enumerate(zip(items, prompts, strict=True))]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def chat_generate(model: nn.Module, chat: ChatCollator, records: Sequence[ChatRecord],
                  **generate_kwargs: Any) -> list[str]:
    """What the model writes as the assistant after each record's conversation (its final assistant turn, if
    any, is left out), decoded without special tokens and stripped."""
    prompts = chat.prompt_batch(records)
    inputs = _to(prompts.inputs, _device(model))
    width = inputs["input_ids"].shape[1]
    output = model.generate(**inputs, **generate_kwargs)
    new = output[:, width:] if output.shape[1] > width else output[:, :0]
    return [chat.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new.tolist()]


@torch.no_grad()
def conversation_losses(model: nn.Module, chat: ChatCollator, records: Sequence[ChatRecord]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood of each record's assistant tokens, and their count: (R,), (R,).

    Records the collator drops as bad input raise (inference must score every record it is given)."""
    batch = _to(chat(records), _device(model))
    labels = batch.pop("labels")
    if labels.shape[0] != len(records):
        raise ValueError(f"{len(records) - labels.shape[0]} of {len(records)} records were dropped as bad input")
    logits = model(**batch).logits
    logits = logits[:, -labels.shape[1]:]
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return nll.sum(dim=1).cpu(), targets.ne(-100).sum(dim=1).cpu()


@torch.no_grad()
def chat_rank(model: nn.Module, chat: ChatCollator, items: Sequence[Mapping[str, Any]], prompts: Sequence[str],
              candidates: Sequence[str], top_k: int) -> list[int]:
    """The index of the most likely candidate answer of each item, scored as the assistant turn.

    The ``top_k`` candidates whose first token is most likely right after the generation prompt are scored in
    full (summed log-likelihood of the assistant tokens, end-of-turn token included); with ``top_k`` >= the
    number of candidates every candidate is scored.
    """
    if not candidates:
        raise ValueError("ranking needs at least one candidate answer")
    shortlist = _first_token_shortlist(model, chat, items, prompts, candidates, top_k)
    picks = []
    for item, prompt, short in zip(items, prompts, shortlist, strict=True):
        records = [single_turn_record(item_images(item), prompt, candidates[c], record_id=str(c)) for c in short]
        nll, _ = conversation_losses(model, chat, records)
        picks.append(short[int(torch.argmin(nll))])
    return picks


def _first_token_shortlist(model: nn.Module, chat: ChatCollator, items: Sequence[Mapping[str, Any]],
                           prompts: Sequence[str], candidates: Sequence[str], top_k: int) -> list[list[int]]:
    if top_k >= len(candidates):
        return [list(range(len(candidates)))] * len(items)
    first = torch.tensor([(chat.tokenizer(c, add_special_tokens=False)["input_ids"] or [0])[0] for c in candidates])
    inputs = _to(chat.prompt_batch(prompt_records(items, prompts)).inputs, _device(model))
    logprobs = model(**inputs).logits[:, -1].float().log_softmax(dim=-1).cpu()
    scores = logprobs[:, first]
    return [row.topk(top_k).indices.tolist() for row in scores]
