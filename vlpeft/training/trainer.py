"""The Hugging Face Trainer, specialised only where vlpeft needs it.

- :class:`VLPeftTrainer.evaluate` runs the task's own inference (ranking/generation) and metric instead of a
  loss-only loop, shards the examples across processes and gathers the predictions, then reports through the
  usual callbacks (so best-checkpoint selection and early stopping work unchanged).
- :meth:`VLPeftTrainer.compute_loss` uses the task's :class:`~vlpeft.tasks.losses.TrainingObjective` (token CE,
  the release VQA per-answer weighted loss, classifier BCE/CE), normalised over the global batch: the divisor
  is summed over accumulated micro-batches and all processes, so ``n`` processes x batch ``b`` train exactly as
  one process with batch ``n * b``.
- :meth:`VLPeftTrainer.get_decay_parameter_names` excludes biases, norm parameters and scalar parameters (p-adapter's
  p and mu offsets) from weight decay.
- :class:`CsvLoggerCallback` appends every logged value to ``logs.csv``.
"""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn
from transformers import Trainer, TrainerCallback

from vlpeft.tasks.collators import split_model_inputs
from vlpeft.training.config import ConfigError
from vlpeft.training.task_binding import TaskBinding
from vlpeft.tuners.param_groups import split_decay_parameters

__all__ = [
    "VLPeftTrainer",
    "CsvLoggerCallback",
    "TrainingDivergedError",
    "check_deepspeed_saves_adapter",
    "decay_parameter_names",
    "enable_fsdp_on_cpu",
    "gather_predictions",
    "non_finite_inputs",
]


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of trainable parameters that get weight decay (``vlpeft.tuners.param_groups``): no decay for biases,
    norm parameters, and p-adapter's p and mu offsets (p-adapter.md H12, ecosystem.md §6 item 6)."""
    return split_decay_parameters(model)[0]


def gather_predictions(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All processes' prediction records (identical list on every rank; a no-op without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records
    gathered: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    return [r for part in gathered for r in part]


def enable_fsdp_on_cpu(accelerator: Any) -> bool:
    """Turn FSDP on for a multi-process CPU (gloo) run launched with an FSDP accelerate config.

    accelerate (checked with 1.16) switches FSDP on only for accelerator devices: with ``use_cpu: true`` its state
    becomes ``MULTI_CPU`` and it silently drops the FSDP plugin, so the model would be trained with DDP instead.
    torch's FSDP (``fully_shard``, FSDP2) itself runs on CPU with gloo, so when ``ACCELERATE_USE_FSDP`` is set and
    the state is ``MULTI_CPU`` this builds the plugin from the launcher's environment (``FSDP_*`` variables, as
    accelerate does) and marks the state as FSDP. Only FSDP2 (``fsdp_version: 2``, the tested path,
    ``tests/training/test_training_fsdp.py``) is switched on; an FSDP1 config raises. Returns whether it switched FSDP on.
    """
    state = accelerator.state
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on CPU processes needs fsdp_version: 2 in the accelerate config "
                         "(configs/accelerate/fsdp2_cpu.yaml)")
    state.fsdp_plugin = plugin
    # AcceleratorState re-reads PartialState's fields whenever it is constructed again: mark both.
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    return True


def check_deepspeed_saves_adapter(ds_config: dict[str, Any]) -> None:
    """Refuse a ZeRO-3 DeepSpeed config that would save an empty adapter.

    Under ZeRO-3 every parameter is partitioned; the Trainer gathers the adapter for saving only when
    ``zero_optimization.stage3_gather_16bit_weights_on_model_save`` is true (accelerate: ``zero3_save_16bit_model``).
    Without it ``Trainer.save_model`` warns and writes an ``adapter_model.safetensors`` with no tensors (DeepSpeed
    #7900, peft #453), so the run would end with nothing usable: raise before training instead.
    """
    zero = ds_config.get("zero_optimization", {}) or {}
    if int(zero.get("stage", 0)) == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise ValueError(
            "DeepSpeed ZeRO-3 without zero_optimization.stage3_gather_16bit_weights_on_model_save: true (accelerate "
            "config: zero3_save_16bit_model: true) saves an empty adapter; set it (configs/accelerate/ds_zero3.json)"
        )


class TrainingDivergedError(ConfigError):
    """Training stopped at the first optimiser step whose loss, gradient norm or updated weights are not finite.

    Raised before that step's optimiser update is applied (loss, gradient norm) or before its checkpoint is written
    (weights), so every checkpoint already on disk stays as it was. A subclass of :class:`ConfigError` (the usual
    cause is a setting: learning rate, precision, clipping), so ``vlpeft train`` prints ``error: ...`` and exits 2.
    When the batch itself holds NaN/inf (e.g. in ``pixel_values``), the message says so instead, naming the step, the
    micro-batch, the tensor and its rows (:func:`non_finite_inputs`, run only once a loss is not finite).

    Attributes:
        step: the optimiser step (1-based, as logged) that diverged.
    """

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


_DIVERGENCE_HINT = ("lower optim.learning_rate, keep optim.max_grad_norm > 0, or use run.precision fp32/bf16; "
                    "checkpoints already written were kept")


def non_finite_inputs(inputs: dict[str, Any]) -> str:
    """Which floating-point tensors of a batch hold NaN/inf, with the rows (batch items) that do; ``""`` if none.

    Called only once a loss is not finite, so a healthy run pays nothing for it."""
    found = []
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            bad = ~torch.isfinite(value.detach())
            if bool(bad.any()):
                rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist() if bad.dim() else []
                kinds = "/".join(k for k, hit in (("NaN", torch.isnan(value).any()), ("inf", torch.isinf(value).any()))
                                 if bool(hit))
                found.append(f"{name} holds {kinds} in {int(bad.sum())} of {value.numel()} values (rows {rows})")
    return "; ".join(found)


class VLPeftTrainer(Trainer):
    """Trainer whose loss is the task's objective and whose evaluation is the task's inference + metric (see the
    module docstring)."""

    loss_is_scaled_for_ga = True  # compute_loss already divides by the accumulated global batch

    def __init__(self, *args: Any, task: TaskBinding, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.task = task
        self.last_predictions: list[dict[str, Any]] = []
        self._non_finite_loss: float | None = None  # first non-finite micro-batch loss of the current step

    # ------------------------------------------------------------------------------------------- divergence
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        self._micro_batch = getattr(self, "_micro_batch", 0) + 1
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._non_finite_loss is None and not bool(torch.isfinite(loss).all()):
            self._non_finite_loss = float(loss.float().reshape(-1)[0])
            self._non_finite_inputs = non_finite_inputs(inputs)
            self._non_finite_micro_batch = self._micro_batch
        return loss

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """The step's gradient norm; raises :class:`TrainingDivergedError` before the optimiser update when the
        step's loss or gradient norm is not finite (on every process alike). Under fp16 loss scaling a non-finite
        gradient norm alone is an overflow the scaler skips, not a divergence."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        step = self.state.global_step + 1
        bad_loss = torch.tensor([0.0 if self._non_finite_loss is None else 1.0], device=self.args.device)
        if self.args.world_size > 1:
            bad_loss = self.accelerator.gather(bad_loss).max().reshape(1)
        self._non_finite_loss, local_loss = None, self._non_finite_loss
        micro_batches, self._micro_batch = getattr(self, "_micro_batch", 0), 0
        if bool(bad_loss.item()):
            value = "non-finite on another process" if local_loss is None else local_loss
            bad_inputs = getattr(self, "_non_finite_inputs", None) if local_loss is not None else None
            if bad_inputs:
                where = (f"the batch of step {step} (micro-batch {self._non_finite_micro_batch} of {micro_batches}, "
                         f"process {self.args.process_index})")
                raise TrainingDivergedError(
                    f"non-finite input values in {where}: {bad_inputs}; the loss is {value}. Stopped before "
                    "updating the weights: check the images/preprocessing of this batch (checkpoints already "
                    "written were kept)", step)
            raise TrainingDivergedError(
                f"training diverged at step {step}: the loss is {value}; stopped before updating the weights "
                f"({_DIVERGENCE_HINT})", step)
        scaled = getattr(self.accelerator, "scaler", None) is not None
        if grad_norm is not None and not scaled and not math.isfinite(float(grad_norm)):
            raise TrainingDivergedError(
                f"training diverged at step {step}: the gradient norm is {float(grad_norm)}; stopped before "
                f"updating the weights ({_DIVERGENCE_HINT})", step)
        return grad_norm

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write a checkpoint only when every trainable weight is finite (else :class:`TrainingDivergedError`)."""
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.numel() and not bool(torch.isfinite(param.detach()).all()):
                step = self.state.global_step
                raise TrainingDivergedError(
                    f"training diverged at step {step}: trainable weight {name} is not finite after the update; "
                    f"checkpoint-{step} was not written ({_DIVERGENCE_HINT})", step)
        super()._save_checkpoint(model, trial)

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator, with FSDP switched on for CPU runs launched with an FSDP accelerate config
        (:func:`enable_fsdp_on_cpu`)."""
        super().create_accelerator_and_postprocess()
        if not self.is_fsdp_enabled and enable_fsdp_on_cpu(self.accelerator):
            self.is_fsdp_enabled = True
        if self.is_deepspeed_enabled:
            check_deepspeed_saves_adapter(self.accelerator.state.deepspeed_plugin.deepspeed_config)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """The objective's divisor summed over the accumulated micro-batches and all processes."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        total = sum(torch.as_tensor(self.task.objective.count(b)).reshape(()) for b in batch_samples)
        total = total.to(device)
        if self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return total

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        objective = self.task.objective
        model_inputs, info = split_model_inputs(inputs)
        labels = model_inputs["labels"] if objective.model_computes_loss else model_inputs.pop("labels")
        if num_items_in_batch is None:  # a lone forward (not the training loop): normalise locally
            num_items_in_batch = objective.count({"labels": labels, **info})
        outputs = model(**model_inputs)
        loss = objective(outputs, labels, info, num_items_in_batch)
        if self.args.world_size > 1:
            loss = loss * self.args.world_size  # DDP averages gradients over processes; the divisor is global
        return (loss, outputs) if return_outputs else loss

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
