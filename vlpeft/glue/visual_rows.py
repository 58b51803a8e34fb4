"""x_R rows per sample and their poolings (``routing.md`` §5, §7).

What :class:`vlpeft.glue.visual_features.VisualFeatureContext` captured in one forward (:class:`Captured`) is turned
here into each sample's visual rows, from three kinds of source: one feature sequence per image (grouped to its sample
through the placeholder tokens), each sample's ``inputs_embeds`` rows at its image placeholders, or a cross-attending
language model's ``cross_attention_states``; then pooled (``pooler``, ``cls``, ``mean``, ``none``) and expanded to the
text batch (beam search).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Captured",
    "MissingVisualFeaturesError",
    "cross_attention_rows",
    "cut_frozen_graph",
    "expand_to_batch",
    "group_by_sample",
    "placeholder_rows",
    "pool",
    "pool_rows",
]


class MissingVisualFeaturesError(RuntimeError):
    """A routed layer ran without visual features for its batch."""


@dataclass
class Captured:
    """Features of one source in one frame.

    sequence: (images, m, d), or (samples, m, d) with ``token_mask``; pooled: (images, d) or None;
    images_per_sample: one count per sample when the images are not one per sample (None: image i belongs to
    sample i); token_mask: (samples, m) bool marking each sample's real visual tokens when they were gathered per
    sample (placeholder rows, left-packed and zero-padded); explicit: given by the user.
    """

    sequence: Tensor | None = None
    token_mask: Tensor | None = None
    pooled: Tensor | None = None
    images_per_sample: list[int] | None = None
    explicit: bool = False
    call: int = 0


def _reaches_parameter(tensor: Tensor) -> bool:
    """Whether ``tensor``'s autograd graph leads to an ``nn.Parameter`` that requires grad (a depth-first walk over
    ``grad_fn.next_functions``, each node once)."""
    stack, seen = [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(getattr(node, "variable", None), torch.nn.Parameter):
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def cut_frozen_graph(tensor: Tensor | None) -> Tensor | None:
    """``tensor`` detached when no trainable parameter lies behind it, else unchanged.

    Visual features can require grad with nothing to train behind them: ``enable_input_require_grads`` (what
    ``prepare_model_for_kbit_training`` and reentrant activation checkpointing rely on) marks the patch embedding's
    output. Every routed layer reads x_R, and under reentrant checkpointing each layer's backward would walk (and
    free) that frozen graph again ("Trying to backward through the graph a second time"). Gradients of trainable
    parameters are the same either way; a gradient with respect to ``pixel_values`` through x_R is not kept.
    """
    if tensor is None or not tensor.requires_grad or tensor.grad_fn is None or _reaches_parameter(tensor):
        return tensor
    return tensor.detach()


def placeholder_rows(
    embeds: Any, input_ids: Tensor | None, image_token_id: int | None, module: str, call: int
) -> Captured | None:
    """Each sample's ``inputs_embeds`` rows at its image placeholder tokens, left-packed and zero-padded to the
    longest: (samples, m, d) and the (samples, m) mask of real rows; ``None`` without placeholders."""
    if not isinstance(embeds, Tensor) or embeds.dim() != 3 or input_ids is None or image_token_id is None:
        return None
    if tuple(input_ids.shape) != tuple(embeds.shape[:2]):
        raise ValueError(
            f"cannot find the image placeholder rows of {module!r}: its inputs_embeds are "
            f"{tuple(embeds.shape[:2])} (batch, length) but the model's input_ids are {tuple(input_ids.shape)}"
        )
    is_image = input_ids == image_token_id
    counts = is_image.sum(dim=1)
    if int(counts.sum()) == 0:
        return None
    longest = int(counts.max())
    # Left-pack each sample's placeholder rows in order: a stable sort puts image positions first.
    order = torch.sort((~is_image).to(torch.int8), dim=1, stable=True).indices[:, :longest]
    rows = embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    token_mask = torch.arange(longest, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)
    rows = rows * token_mask.unsqueeze(-1).to(rows.dtype)
    return Captured(sequence=rows, token_mask=token_mask, call=call)


def pool(captured: Captured, pooling: str, source: str) -> tuple[Tensor, Tensor | None]:
    """Pool per sample: returns (samples, k, d) and an optional (samples, k) mask of real tokens."""
    if pooling == "pooler":
        if captured.pooled is None:
            raise ValueError(
                f"pooling='pooler' needs a pooled output from {source!r} (or a pooler_module); this model has none. "
                "Use pooling='cls', 'mean' or 'none'."
            )
        if captured.images_per_sample is not None:
            raise ValueError(
                "pooling='pooler' is ambiguous with several images per sample; use pooling='mean' or 'none'"
            )
        return captured.pooled.unsqueeze(1), None
    if captured.sequence is None:
        raise ValueError(f"pooling={pooling!r} needs the feature sequence of {source!r}, but only a pooled output was captured")
    sequence = captured.sequence
    if captured.token_mask is not None:
        return pool_rows(sequence, captured.token_mask, pooling, source)
    if captured.images_per_sample is None:
        if pooling == "cls":
            return sequence[:, :1], None
        if pooling == "mean":
            return sequence.mean(dim=1, keepdim=True), None
        return sequence, None
    grouped, mask = group_by_sample(sequence, captured.images_per_sample, source)
    if pooling == "cls":
        return grouped[:, :1], None
    if pooling == "mean":
        weights = mask.to(grouped.dtype).unsqueeze(-1)
        return (grouped * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True), None
    return grouped, mask


def cross_attention_rows(kwargs: dict[str, Any], module: str, call: int) -> Captured | None:
    """x_R from a cross-attending language model's ``cross_attention_states`` ((batch * images * tiles, patches, d)
    or (batch, m, d)), as (batch, m, d) per sample, with the real rows marked by the 4-D additive
    ``cross_attention_mask`` (batch, 1, n_text, m) where one is given (padding images and tiles are never
    attended), over the text rows that ``full_text_row_masked_out_mask`` (batch, 1, n_text, 1) keeps."""
    states = kwargs.get("cross_attention_states")
    if not isinstance(states, Tensor):
        return None
    mask = kwargs.get("cross_attention_mask")
    batch = mask.shape[0] if isinstance(mask, Tensor) else states.shape[0]
    if states.dim() != 3 or states.numel() % (batch * states.shape[-1]):
        raise ValueError(f"cross_attention_states of {module!r} must be (batch * k, m, d) for a batch of {batch}, "
                         f"got {tuple(states.shape)}")
    rows = states.reshape(batch, -1, states.shape[-1])
    token_mask = None
    if isinstance(mask, Tensor) and mask.dim() == 4 and mask.shape[-1] == rows.shape[1]:
        attended = mask == 0 if mask.dtype != torch.bool else mask
        rows_in_use = kwargs.get("full_text_row_masked_out_mask")
        if isinstance(rows_in_use, Tensor):  # text rows that see no image are unmasked to all keys, then zeroed
            attended = attended & rows_in_use.bool()
        token_mask = attended.any(dim=2).any(dim=1)
        rows = rows * token_mask.unsqueeze(-1).to(rows.dtype)
    return Captured(sequence=rows, token_mask=token_mask, call=call)


def pool_rows(rows: Tensor, token_mask: Tensor, pooling: str, source: str) -> tuple[Tensor, Tensor | None]:
    """Pool per-sample rows (samples, m, d) with their (samples, m) mask of real tokens (``cls`` takes row 0, which
    is a real token: placeholder rows are left-packed, and cross-attention states start with the first image)."""
    counts = token_mask.sum(dim=1)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise MissingVisualFeaturesError(
            f"samples {empty} of the batch have no image, so routed layers have no visual features from "
            f"{source!r} for them"
        )
    if pooling == "cls":
        return rows[:, :1], None
    if pooling == "mean":
        weights = token_mask.to(rows.dtype).unsqueeze(-1)
        return (rows * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True), None
    return rows, None if bool(token_mask.all()) else token_mask


def group_by_sample(sequence: Tensor, per_sample: list[int], source: str) -> tuple[Tensor, Tensor]:
    """(images, m, d) -> (samples, max_images * m, d), zero-padded, and the (samples, max_images * m) mask."""
    if any(n == 0 for n in per_sample):
        empty = [i for i, n in enumerate(per_sample) if n == 0]
        raise MissingVisualFeaturesError(
            f"samples {empty} of the batch have no image, so routed layers have no visual features from "
            f"{source!r} for them"
        )
    m, d = sequence.shape[1], sequence.shape[2]
    longest = max(per_sample) * m
    rows = []
    masks = []
    for chunk in torch.split(sequence, per_sample, dim=0):
        tokens = chunk.reshape(-1, d)
        pad = longest - tokens.shape[0]
        rows.append(torch.cat([tokens, tokens.new_zeros(pad, d)]) if pad else tokens)
        mask = torch.zeros(longest, dtype=torch.bool, device=sequence.device)
        mask[: tokens.shape[0]] = True
        masks.append(mask)
    return torch.stack(rows), torch.stack(masks)


def expand_to_batch(
    features: Tensor, mask: Tensor | None, text_batch: int, requester: str
) -> tuple[Tensor, Tensor | None]:
    samples = features.shape[0]
    if samples == text_batch:
        return features, mask
    if samples > 0 and text_batch % samples == 0:
        repeats = text_batch // samples
        expanded_mask = None if mask is None else mask.repeat_interleave(repeats, dim=0)
        return features.repeat_interleave(repeats, dim=0), expanded_mask
    raise ValueError(
        f"routed module {requester!r} sees a batch of {text_batch} rows but the visual features have {samples} "
        "samples; the text batch must equal the feature batch or be a multiple of it (beam expansion)"
    )


