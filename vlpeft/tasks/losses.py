"""Per-sequence weighted token loss for generative VQA batches (one sequence per answer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_sequence_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    sequence_weights: torch.Tensor,
    num_items: int,
    *,
    shift: bool = True,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``sum_s w_s * (summed token CE of sequence s) / num_items`` (BLIP / p-adapter release VQA loss).

    Args:
        logits: (sequences, length, vocab). Logits beyond ``labels``' length at the front (image tokens of
            BLIP-2) are dropped: the last ``labels.shape[1]`` positions are used.
        labels: (sequences, length), -100 where no loss.
        sequence_weights: (sequences,).
        num_items: number of questions in the batch (the divisor).
        shift: True when position t predicts label t+1 (causal LMs, BLIP decoder); False for
            VisionEncoderDecoder-style labels already aligned with the logits.
        label_smoothing: as in ``torch.nn.functional.cross_entropy`` (BLIP uses 0.1).
    """
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    logits = logits[:, -labels.shape[1]:, :]
    if shift:
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                 ignore_index=-100, reduction="none", label_smoothing=label_smoothing)
    per_sequence = token_loss.view(labels.shape).sum(dim=1)
    return (per_sequence * sequence_weights.to(per_sequence.dtype)).sum() / num_items
