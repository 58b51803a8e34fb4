"""Training losses: the per-sequence weighted token loss of generative VQA (one sequence per answer) and the
trainer's objectives (token CE, weighted sequences, classifier BCE/CE), each normalised over the global batch."""

from __future__ import annotations

import abc
from typing import Any

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


# ------------------------------------------------------------------------------------ training objectives
def _logits(outputs: Any) -> torch.Tensor:
    logits = outputs["logits"] if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError(f"{type(outputs).__name__} has no logits; this objective needs the model's logits")
    return logits


def _align_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Labels left-padded with -100 to the logits' length (visual positions prepended by the model)."""
    extra = logits.shape[1] - labels.shape[1]
    if extra < 0:
        raise ValueError(f"labels cover {labels.shape[1]} positions but the logits only {logits.shape[1]}")
    if extra == 0:
        return labels
    return torch.cat([labels.new_full((labels.shape[0], extra), -100), labels], dim=1)


class TrainingObjective(abc.ABC):
    """A loss normalised by a count over the whole (accumulated, all-process) batch.

    ``count(batch)`` is what one micro-batch contributes to the divisor; the trainer sums it over the
    accumulated micro-batches and all processes and passes the total to ``__call__`` as ``num_items``, so that
    ``n`` processes x batch ``b`` equal one process with batch ``n * b`` and gradient accumulation is exact.
    ``__call__(outputs, labels, info, num_items)`` returns the micro-batch's share of the global loss.
    ``model_computes_loss``: the labels go into the model's forward (its own loss is used).
    """

    model_computes_loss = False

    @abc.abstractmethod
    def count(self, batch: dict[str, Any]) -> torch.Tensor:
        """What one micro-batch contributes to the loss divisor."""

    @abc.abstractmethod
    def __call__(self, outputs: Any, labels: torch.Tensor, info: dict[str, torch.Tensor],
                 num_items: torch.Tensor | int) -> torch.Tensor:
        """The micro-batch's share of the global loss."""


class TokenObjective(TrainingObjective):
    """Next-token cross-entropy summed over target tokens / number of target tokens (one sequence per example).

    Logits longer than the labels (a visual prefix the model prepends) are aligned on the right; with
    ``prefix_predicts_first_token`` the last prefix position trains the first text token.
    """

    def __init__(self, label_smoothing: float = 0.0, prefix_predicts_first_token: bool = False) -> None:
        self.label_smoothing = label_smoothing
        self.prefix_predicts_first_token = prefix_predicts_first_token

    def count(self, batch: dict[str, Any]) -> torch.Tensor:
        labels = batch["labels"]
        return labels.ne(-100).sum() if self.prefix_predicts_first_token else labels[:, 1:].ne(-100).sum()

    def __call__(self, outputs, labels, info, num_items):
        logits = _logits(outputs)
        labels = _align_labels(logits, labels.to(logits.device))
        total = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                ignore_index=-100, reduction="sum", label_smoothing=self.label_smoothing)
        return total / _as_tensor(num_items, total)


class WeightedSequenceObjective(TrainingObjective):
    """The release VQA loss: per-answer summed token CE, weighted by ``sequence_weights`` (count/10), summed, and
    divided by the number of questions (:func:`weighted_sequence_loss`, global-batch normalised)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def count(self, batch: dict[str, Any]) -> torch.Tensor:
        index = batch["sequence_item_index"]
        return torch.unique(index).numel() * torch.ones((), dtype=torch.long)

    def __call__(self, outputs, labels, info, num_items):
        logits = _logits(outputs)
        labels = _align_labels(logits, labels.to(logits.device))
        weights = info["sequence_weights"].to(logits.device)
        token = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                ignore_index=-100, reduction="none", label_smoothing=self.label_smoothing)
        per_sequence = token.view(labels.shape[0], -1).sum(dim=1)
        return (per_sequence * weights).sum() / _as_tensor(num_items, per_sequence)


class ClassificationObjective(TrainingObjective):
    """Classifier losses: ``multi_label`` (BCE-with-logits against soft scores, averaged over examples and
    classes: the composite's VQA loss) or ``single_label`` (cross-entropy on class ids, averaged over examples)."""

    def __init__(self, problem: str) -> None:
        if problem not in ("multi_label", "single_label"):
            raise ValueError(f"problem must be 'multi_label' or 'single_label', got {problem!r}")
        self.problem = problem

    def count(self, batch: dict[str, Any]) -> torch.Tensor:
        return torch.tensor(batch["labels"].shape[0])

    def __call__(self, outputs, labels, info, num_items):
        logits = _logits(outputs).float()
        labels = labels.to(logits.device)
        if self.problem == "multi_label":
            total = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum") / logits.shape[-1]
        else:
            total = F.cross_entropy(logits, labels, reduction="sum")
        return total / _as_tensor(num_items, total)


def _as_tensor(value: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(value), device=like.device, dtype=like.dtype)


class ModelLossObjective(TrainingObjective):
    """The model's own mean loss (for models that return no logits, e.g. ``BlipForQuestionAnswering``), averaged
    over the micro-batches of the global batch. The labels are passed to the model."""

    model_computes_loss = True

    def count(self, batch: dict[str, Any]) -> torch.Tensor:
        return torch.tensor(1)

    def __call__(self, outputs, labels, info, num_items):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if loss is None:
            raise ValueError(f"{type(outputs).__name__} returned no loss although labels were given")
        return loss / _as_tensor(num_items, loss)
