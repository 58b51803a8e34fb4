"""Where the assistant tokens are in a processed conversation, found through the chat template only.

Two ways, both giving per-record ``[start, end)`` token spans, one per assistant turn:

- *markers*: the template's ``{% generation %}`` markers, through ``processor.apply_chat_template(...,
  return_assistant_tokens_mask=True)`` (transformers maps the marked characters onto the tokens, image placeholder
  expansion included, where the processor reports its text replacements);
- *prefix*: the conversation up to each assistant turn rendered with ``add_generation_prompt=True`` (where the
  answer starts) and up to the end of that turn (where it ends), each processed with its images, so that the
  lengths count the expanded image placeholders.

Spans lose trailing tokens that decode to whitespace only (the newline some templates write after the end-of-turn
token), in both ways, so they agree: the answer text and its end-of-turn token.

Also the per-token tensor helpers of the collator (right-padding check, truncation of ``[B, L, ...]`` tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Span = tuple[int, int]


def spans_from_mask(mask: Sequence[int] | torch.Tensor) -> list[Span]:
    """Maximal runs of ones in a 0/1 mask of shape ``[L]``, as ``[start, end)`` spans."""
    values = [int(v) for v in (mask.tolist() if isinstance(mask, torch.Tensor) else mask)]
    spans: list[Span] = []
    start = None
    for position, value in enumerate([*values, 0]):
        if value and start is None:
            start = position
        elif not value and start is not None:
            spans.append((start, position))
            start = None
    return spans


def trim_spans(spans: Sequence[Span], ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[Span]:
    """Drop tokens that decode to whitespace only from the end of each span; spans left empty are dropped."""
    out = []
    for start, end in spans:
        while end > start and not decode([int(ids[end - 1])]).strip():
            end -= 1
        if end > start:
            out.append((start, end))
    return out


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading positions where ``a`` and ``b`` agree."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_requests(messages: Sequence[dict[str, Any]], render: Callable[..., str], full_text: str,
                    record: str) -> list[tuple[str, int]]:
    """The texts to process to locate each assistant turn of ``messages`` by prefixes.

    Returns ``[(text, n_images), ...]``: for every assistant turn, the conversation before it with the generation
    prompt, then the conversation through it; ``n_images`` is how many of the record's images they hold.

    Raises:
        ValueError: the template does not render these prefixes as prefixes of ``full_text`` (then the assistant
            tokens cannot be located this way; a template with ``{% generation %}`` markers is needed).
    """
    requests = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        for upto, generation in ((k, True), (k + 1, False)):
            text = render(list(messages[:upto]), add_generation_prompt=generation)
            if not full_text.startswith(text):
                raise ValueError(
                    f"{record}: the chat template renders the conversation up to turn {upto} "
                    f"(add_generation_prompt={generation}) as {text[-80:]!r}, which is not a prefix of the whole "
                    f"conversation's rendering; the assistant tokens cannot be found from prefixes; use a template "
                    f"with {{% generation %}} markers (label_method='markers')")
            n_images = sum(1 for m in messages[:upto] for p in m["content"] if p.get("type") == "image")
            requests.append((text, n_images))
    return requests


def spans_from_prefixes(full_ids: Sequence[int], prefix_ids: Sequence[Sequence[int]]) -> list[Span]:
    """Assistant spans from the processed prefixes of :func:`prefix_requests` (pairs: before, through each turn).

    The start is where the ids of the prompt prefix stop agreeing with ``full_ids`` (a token merged across the
    boundary counts as the answer's); the end is the length of the prefix through the turn.
    """
    spans = []
    for before, through in zip(prefix_ids[0::2], prefix_ids[1::2]):
        start = common_prefix_length(before, full_ids)
        end = min(len(through), len(full_ids))
        if end > start:
            spans.append((start, end))
    return spans


def labels_from_spans(input_ids: torch.Tensor, spans: Sequence[Sequence[Span]]) -> torch.Tensor:
    """``labels`` of shape ``[B, L]``: ``input_ids`` inside the spans of each row, -100 elsewhere."""
    labels = torch.full_like(input_ids, -100)
    for row, row_spans in enumerate(spans):
        for start, end in row_spans:
            labels[row, start:end] = input_ids[row, start:end]
    return labels


def check_right_padded(attention_mask: torch.Tensor) -> None:
    """Raise unless every row of the ``[B, L]`` mask is ones then zeros."""
    lengths = attention_mask.sum(dim=1, keepdim=True)
    positions = torch.arange(attention_mask.shape[1]).unsqueeze(0)
    if not torch.equal(attention_mask.bool(), positions < lengths):
        raise RuntimeError("the processor did not pad on the right although padding_side='right' was asked for")


def truncate_per_token(batch: dict[str, torch.Tensor], max_length: int) -> dict[str, torch.Tensor]:
    """Cut every per-token tensor (integer or bool, shape ``[B, L, ...]``) to ``[B, max_length, ...]``."""
    shape = batch["input_ids"].shape
    out = {}
    for key, value in batch.items():
        per_token = (isinstance(value, torch.Tensor) and value.ndim >= 2 and tuple(value.shape[:2]) == tuple(shape)
                     and not value.is_floating_point() and not key.startswith(("pixel", "image")))
        out[key] = value[:, :max_length] if per_token else value
    return out
