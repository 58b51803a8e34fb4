"""The Hugging Face Trainer, specialised only where vlpeft needs it.

- :class:`VLPeftTrainer.evaluate` runs the task's own inference (ranking/generation) and metric instead of a
  loss-only loop, shards the examples across processes and gathers the predictions, then reports through the
  usual callbacks (so best-checkpoint selection and early stopping work unchanged).
- :meth:`VLPeftTrainer.get_decay_parameter_names` excludes biases, norm parameters and scalar parameters (p-adapter's
  p and mu offsets) from weight decay.
- :class:`CsvLoggerCallback` appends every logged value to ``logs.csv``.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback

from vlpeft.training.task_binding import TaskBinding

__all__ = ["VLPeftTrainer", "CsvLoggerCallback", "TokenLoss", "decay_parameter_names", "gather_predictions"]

def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of trainable parameters that get weight decay (``vlpeft.tuners.param_groups``): no decay for biases,
    norm parameters, and p-adapter's p and mu offsets (p-adapter.md H12, ecosystem.md §6 item 6)."""
    from vlpeft.tuners.param_groups import split_decay_parameters

    return split_decay_parameters(model)[0]


class TokenLoss:
    """Next-token cross-entropy summed over target tokens and divided by the number of target tokens in the whole
    (accumulated, all-process) batch, passed by the Trainer as ``num_items_in_batch``.

    With this normalisation, ``n`` processes x batch ``b`` give the same gradient as one process with batch
    ``n * b`` (and gradient accumulation is exact), which a per-device mean loss does not when sequences have
    different numbers of target tokens. Logits may be longer than the labels (visual prefix positions); the last
    ``labels.shape[1]`` positions are the text.

    Args:
        label_smoothing: cross-entropy label smoothing (0.1 in the p-adapter release).
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        logits = logits[:, logits.shape[1] - labels.shape[1] :]
        shifted_logits = logits[:, :-1].float()
        shifted_labels = labels[:, 1:].to(logits.device)
        total = torch.nn.functional.cross_entropy(
            shifted_logits.reshape(-1, shifted_logits.shape[-1]),
            shifted_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
            label_smoothing=self.label_smoothing,
        )
        if num_items_in_batch is None:
            num_items_in_batch = shifted_labels.ne(-100).sum()
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch


def gather_predictions(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All processes' prediction records (identical list on every rank; a no-op without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records
    gathered: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    return [r for part in gathered for r in part]


class VLPeftTrainer(Trainer):
    """Trainer whose evaluation is the task's inference + metric (see the module docstring)."""

    def __init__(self, *args: Any, task: TaskBinding, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.task = task
        self.last_predictions: list[dict[str, Any]] = []

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return decay_parameter_names(model)

    def predict_task(self, dataset: Any) -> list[dict[str, Any]]:
        """Task predictions on ``dataset``; each process predicts every ``world_size``-th example."""
        rank, world = self.args.process_index, self.args.world_size
        indices = list(range(rank, len(dataset), world))
        model = self.accelerator.unwrap_model(self.model)
        return gather_predictions(self.task.predict(model, dataset, indices))

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an evaluation dataset (task.eval)")
        start = time.time()
        records = self.predict_task(dataset)
        self.last_predictions = records
        scores = self.task.score(records, dataset)
        metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in scores.items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        metrics[f"{metric_key_prefix}_samples"] = len(records)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class CsvLoggerCallback(TrainerCallback):
    """Append ``step, epoch, key, value`` rows to ``<output_dir>/logs.csv`` for every logged scalar."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return control
        new = not self.path.exists()
        with open(self.path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", "epoch", "key", "value"])
            for key, value in logs.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    writer.writerow([state.global_step, state.epoch, key, value])
                elif isinstance(value, torch.Tensor) and value.numel() == 1:
                    writer.writerow([state.global_step, state.epoch, key, value.item()])
        return control
