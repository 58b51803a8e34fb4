"""Python API: :func:`run_training`, :func:`evaluate`, :func:`predict`.

Each takes a :class:`~vlpeft.training.config.TrainConfig` (see :func:`~vlpeft.training.config.load_config`);
everything that can be checked is checked before any model is loaded (:func:`validate_config`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import EarlyStoppingCallback, TrainerCallback, TrainingArguments, set_seed

import vlpeft  # noqa: F401  (registers vlpeft methods with PEFT)
from vlpeft._transformers_compat import activation_checkpointing_arguments
from vlpeft.training.checkpoints import (
    CheckpointCompletionCallback,
    atomic_write_text,
    checkpoint_problem,
    find_resume_checkpoint,
    list_checkpoints,
    weights_problem,
)
from vlpeft.training.config import ConfigError, TrainConfig, config_to_dict, save_config
from vlpeft.training.methods import apply_method, count_parameters
from vlpeft.training.models import load_model, load_processor
from vlpeft.training.task_binding import (
    LOWER_IS_BETTER,
    TaskBinding,
    answer_list,
    build_task,
    check_answer_coverage,
    load_datasets,
    num_labels_for,
    target_texts,
    tokenizer_texts,
)
from vlpeft.training.trainer import CsvLoggerCallback, VLPeftTrainer
from vlpeft.training.validation import ValidatedPlan, validate_config

__all__ = ["RunResult", "run_training", "evaluate", "predict", "peak_memory_bytes", "format_summary"]

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"


@dataclass
class RunResult:
    """Outcome of a training run (also written to ``<output_dir>/metrics.json``).

    Attributes:
        output_dir: the run folder.
        metric: name of the selection metric; metric_value: its final evaluation value (``None`` without eval).
        metrics: ``{"eval": {...}, "test": {...}, "train": {...}}`` final metrics.
        trainable_params / total_params / trainable_percent: parameter counts of the adapted model.
        wall_time_s: seconds from start to end of :func:`run_training`.
        peak_memory_bytes: peak CUDA memory allocated, or the process's peak RSS on CPU.
        peak_memory_device: ``"cuda"`` or ``"cpu"``.
        best_checkpoint: the selected checkpoint folder (``None`` without evaluation).
        global_step: optimiser steps done.
        resumed_from: checkpoint training resumed from, if any.
    """

    output_dir: Path
    metric: str
    metric_value: float | None
    metrics: dict[str, dict[str, float]]
    trainable_params: int
    total_params: int
    trainable_percent: float
    wall_time_s: float
    peak_memory_bytes: int
    peak_memory_device: str
    best_checkpoint: str | None
    global_step: int
    resumed_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        data["output_dir"] = str(self.output_dir)
        return data

    def summary_line(self) -> str:
        return format_summary(self)


def peak_memory_bytes() -> tuple[int, str]:
    """(peak bytes, device): ``torch.cuda.max_memory_allocated`` on CUDA, else peak resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "cuda"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu"


def _human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _human_time(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_summary(result: RunResult) -> str:
    """One line: metric, trainable parameters and %, wall time, peak memory."""
    metric = "n/a" if result.metric_value is None else f"{result.metric_value:.2f}"
    return (
        f"{result.metric}={metric} | trainable {_human_count(result.trainable_params)} / "
        f"{_human_count(result.total_params)} params ({result.trainable_percent:.3f}%) | wall "
        f"{_human_time(result.wall_time_s)} | peak memory {result.peak_memory_bytes / 2**30:.2f} GiB "
        f"({result.peak_memory_device})"
    )


# ---------------------------------------------------------------------------------------------- assembly
def _training_arguments(config: TrainConfig, plan: ValidatedPlan, has_eval: bool) -> TrainingArguments:
    optim, ev, run = config.optim, config.eval, config.run
    eval_strategy = ev.strategy if has_eval else "no"
    if eval_strategy == "steps":
        save_strategy, save_steps = "steps", run.save_steps or ev.steps
    elif eval_strategy == "epoch":
        if run.save_steps:
            raise ConfigError("run.save_steps: step checkpoints need eval.strategy 'steps' or 'no' (not 'epoch')")
        save_strategy, save_steps = "epoch", 500
    else:
        save_strategy, save_steps = ("steps", run.save_steps) if run.save_steps else ("epoch", 500)
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(config.resolve_path(run.output_dir)),
        per_device_train_batch_size=optim.batch_size,
        per_device_eval_batch_size=optim.eval_batch_size or optim.batch_size,
        gradient_accumulation_steps=optim.gradient_accumulation_steps,
        learning_rate=optim.learning_rate,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_epsilon=optim.adam_epsilon,
        optim="adamw_torch",
        lr_scheduler_type=optim.lr_scheduler,
        warmup_steps=optim.warmup_steps if optim.warmup_steps > 0 else optim.warmup_ratio,
        max_grad_norm=optim.max_grad_norm,
        num_train_epochs=optim.num_epochs,
        max_steps=optim.max_steps,
        eval_strategy=eval_strategy,
        eval_steps=ev.steps if eval_strategy == "steps" else None,
        save_strategy=save_strategy,
        save_steps=save_steps,
        save_total_limit=run.save_total_limit,
        logging_steps=run.logging_steps,
        logging_first_step=True,
        seed=run.seed,
        data_seed=run.seed,
        bf16=run.precision == "bf16",
        fp16=run.precision == "fp16",
        **activation_checkpointing_arguments(run.gradient_checkpointing),
        report_to=["tensorboard"] if "tensorboard" in run.report_to and _tensorboard_available() else "none",
        load_best_model_at_end=ev.load_best_at_end and eval_strategy != "no",
        metric_for_best_model=plan.metric if eval_strategy != "no" else None,
        greater_is_better=plan.metric not in LOWER_IS_BETTER,
        disable_tqdm=not run.progress_bar,
        remove_unused_columns=False,
        dataloader_num_workers=run.dataloader_num_workers,
        label_names=["labels"],
        use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )


def _tensorboard_available() -> bool:
    """Whether a TensorBoard writer can be imported; warns (and the logger is skipped) when it cannot."""
    if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
        return True
    warnings.warn("run.report_to lists 'tensorboard' but TensorBoard is not installed (pip install "
                  "'vlpeft[logging]'); skipping the TensorBoard logger", stacklevel=3)
    return False


@dataclass
class _Assembled:
    plan: ValidatedPlan
    model: Any
    processor: Any
    task: TaskBinding
    total_params: int


def _assemble(config: TrainConfig, plan: ValidatedPlan, checkpoint: str | os.PathLike | None = None) -> _Assembled:
    """Datasets, processor, model (+ method or a saved adapter), task binding."""
    datasets = load_datasets(config)
    answers = answer_list(config, datasets[0]) if config.task.type in ("vqa", "gqa") else None
    coverage = check_answer_coverage(config, datasets, answers, training=checkpoint is None)
    if coverage is not None and _is_main_process():
        print(f"vlpeft: {coverage.line()}", file=sys.stderr)
    processor = load_processor(config, plan.family, tokenizer_texts(datasets) + list(answers or ())
                               + target_texts(config, plan.family))
    set_seed(config.run.seed)
    model = load_model(config, plan.family, num_labels_for(config, answers))
    _, total = count_parameters(model)
    if checkpoint is None:
        model = apply_method(model, config.method.type, plan.method_config, plan.family)
    else:
        model = _load_trained(model, config, Path(checkpoint))
    task = build_task(config, processor, plan.family, model.config, datasets, answers)
    return _Assembled(plan, model, processor, task, total)


def _load_trained(model: Any, config: TrainConfig, folder: Path) -> Any:
    """Load trained weights from a run folder or checkpoint (PEFT adapter or full model weights); the folder is
    validated first (:func:`~vlpeft.training.checkpoints.weights_problem`: a truncated or corrupt weights file is a
    :class:`ConfigError` naming it)."""
    problem = weights_problem(folder)
    if problem is not None:
        raise ConfigError(f"--checkpoint: {folder} cannot be loaded: {problem}")
    if (folder / "adapter_config.json").is_file():
        peft_model = PeftModel.from_pretrained(model, str(folder))
        unused = unused_adapter_keys(peft_model, folder)
        if unused:
            raise ConfigError(
                f"--checkpoint: {folder / 'adapter_model.safetensors'} holds {len(unused)} weight(s) this model has no "
                f"place for, e.g. {unused[:5]} (was the adapter trained on another model, e.g. one with more "
                "layers? check model.name / model.tiny)")
        return peft_model
    weights = folder / "model.safetensors"
    if weights.is_file():
        missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
        if unexpected:
            raise ValueError(f"{weights}: unexpected keys {unexpected[:5]} (is this checkpoint for this model?)")
        return model
    raise ConfigError(f"--checkpoint: {folder} holds neither adapter_config.json nor model.safetensors")


def unused_adapter_keys(peft_model: Any, folder: str | os.PathLike) -> list[str]:
    """Tensor names of ``folder``'s ``adapter_model.safetensors`` that ``peft_model`` (just loaded from it) did not
    take: PEFT drops them silently, e.g. the extra layers' weights of an adapter trained on a deeper model."""
    weights = Path(folder) / "adapter_model.safetensors"
    if not weights.is_file():
        return []
    with safe_open(str(weights), framework="pt") as handle:
        saved = list(handle.keys())
    expected = set(get_peft_model_state_dict(peft_model))
    return sorted(key for key in saved if key not in expected)


def _prepare_resume(config: TrainConfig, output_dir: Path) -> str | None:
    """The checkpoint to resume from (``run.resume``); corrupt newer checkpoints are moved aside."""
    if config.run.resume == "never":
        if list_checkpoints(output_dir):
            raise ConfigError(
                f"run.resume: {output_dir} already holds checkpoints; use run.resume=auto or another run.output_dir"
            )
        return None
    if config.run.resume != "auto":
        path = config.resolve_path(config.run.resume)
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ConfigError(f"run.resume: {path} cannot be resumed from: {problem}")
        return str(path)
    chosen = find_resume_checkpoint(output_dir)
    if _is_main_process():
        for folder in list_checkpoints(output_dir):
            if chosen is None or int(folder.name.split("-")[1]) > int(chosen.name.split("-")[1]):
                folder.rename(folder.with_name(f"corrupt-{folder.name}-{int(time.time())}"))
    _barrier()
    return None if chosen is None else str(chosen)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _announce_resume(resume: str | None, trainer: VLPeftTrainer) -> int:
    """Print (main process) which checkpoint training resumes from; returns its step (0 without a resume)."""
    if resume is None:
        return 0
    try:
        step = int(json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        step = int(Path(resume).name.rsplit("-", 1)[-1]) if Path(resume).name.rsplit("-", 1)[-1].isdigit() else 0
    if trainer.is_world_process_zero():
        print(f"vlpeft train: resuming from checkpoint {step} ({resume}); optimiser, scheduler, RNG and data "
              "order are restored", flush=True)
    return step


def _whole_run_train_metrics(
    metrics: dict[str, float], log_history: list[dict[str, Any]], resumed_step: int, global_step: int
) -> dict[str, float]:
    """The Trainer's train metrics with ``train_loss`` over the whole run, also after a resume.

    After a resume the Trainer averages only the steps this process trained. The steps before the resume are taken
    from the logged losses in the restored ``log_history`` (each logged ``loss`` is the mean of its logging window).
    ``train_loss_first_step`` / ``train_loss_last_step`` name the steps ``train_loss`` covers: the whole run when the
    logged windows reach the resumed checkpoint, else only the steps since the resume (``train_loss_since_resume``
    is always the latter).
    """
    out = dict(metrics)
    if "train_loss" not in out:
        return out
    first = resumed_step + 1
    if resumed_step > 0:
        out["train_loss_since_resume"] = out["train_loss"]
        total, previous = 0.0, 0
        for entry in log_history:
            step = int(entry.get("step", 0))
            if "loss" in entry and previous < step <= resumed_step:
                total += float(entry["loss"]) * (step - previous)
                previous = step
        if previous == resumed_step:
            trained = global_step - resumed_step
            out["train_loss"] = (total + out["train_loss"] * trained) / max(global_step, 1)
            first = 1
    out["train_loss_first_step"] = float(first)
    out["train_loss_last_step"] = float(global_step)
    return out


def _save_final(trainer: VLPeftTrainer, assembled: _Assembled, config: TrainConfig, output_dir: Path) -> None:
    """Write the trained model (PEFT adapter or full weights), processor and resolved config atomically:
    everything goes to a temporary folder first, then each file is moved into place with ``os.replace``.

    Called on every process (``Trainer.save_model`` may synchronise them); only the main process writes.
    """
    staging = output_dir / ".final-tmp"
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    trainer.save_model(str(staging))
    if not main:
        return
    if hasattr(assembled.processor, "save_pretrained"):
        assembled.processor.save_pretrained(str(staging))
    save_config(config, staging / CONFIG_FILE)
    for item in staging.iterdir():
        target = output_dir / item.name
        if item.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(item, target)
    staging.rmdir()


def run_training(config: TrainConfig, callbacks: Sequence[TrainerCallback] = ()) -> RunResult:
    """Train ``config`` end to end: validate, load, train (resuming from the last valid checkpoint), select the
    best checkpoint, evaluate on ``task.eval`` and ``task.test``, and write the run folder.

    Works unchanged under ``torchrun``/``accelerate launch`` (one call per process).
    """
    start = time.time()
    plan = validate_config(config, for_training=True)
    output_dir = config.resolve_path(config.run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resume = _prepare_resume(config, output_dir)
    assembled = _assemble(config, plan)
    task = assembled.task
    args = _training_arguments(config, plan, has_eval=task.eval_dataset is not None)
    all_callbacks: list[TrainerCallback] = [CheckpointCompletionCallback(), *callbacks]
    if "csv" in config.run.report_to:
        all_callbacks.append(CsvLoggerCallback(output_dir / "logs.csv"))
    if config.eval.early_stopping_patience:
        all_callbacks.append(EarlyStoppingCallback(config.eval.early_stopping_patience))
    trainer_class = task.extras.get("trainer_class", VLPeftTrainer)  # multi-task: VL-Adapter batch order
    trainer = trainer_class(
        model=assembled.model,
        args=args,
        train_dataset=task.train_dataset,
        eval_dataset=task.eval_dataset,
        data_collator=task.collate,
        callbacks=all_callbacks,
        task=task,
    )
    resumed_step = _announce_resume(resume, trainer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not support `output_attentions`.*")
        train_output = trainer.train(resume_from_checkpoint=resume)

    metrics: dict[str, dict[str, float]] = {
        "train": _whole_run_train_metrics(dict(train_output.metrics), trainer.state.log_history, resumed_step,
                                          trainer.state.global_step)
    }
    predictions: dict[str, list[dict[str, Any]]] = {}
    for split, dataset in (("eval", task.eval_dataset), ("test", task.test_dataset)):
        if dataset is None:
            continue
        values = trainer.evaluate(dataset, metric_key_prefix=split)
        metrics[split] = {k[len(split) + 1 :]: v for k, v in values.items() if k.startswith(f"{split}_")}
        predictions[split] = trainer.last_predictions

    trainable, _ = count_parameters(assembled.model)
    total = assembled.total_params + (0 if config.method.type == "full" else trainable)
    peak, device = peak_memory_bytes()
    value = metrics.get("eval", metrics.get("test", {})).get(plan.metric)
    result = RunResult(
        output_dir=output_dir,
        metric=plan.metric,
        metric_value=value,
        metrics=metrics,
        trainable_params=trainable,
        total_params=total,
        trainable_percent=100.0 * trainable / total,
        wall_time_s=time.time() - start,
        peak_memory_bytes=peak,
        peak_memory_device=device,
        best_checkpoint=trainer.state.best_model_checkpoint,
        global_step=trainer.state.global_step,
        resumed_from=resume,
    )
    _save_final(trainer, assembled, config, output_dir)
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
        for split, records in predictions.items():
            atomic_write_text(output_dir / f"predictions_{split}.json", json.dumps(records, indent=1))
        atomic_write_text(output_dir / METRICS_FILE, json.dumps(result.to_json(), indent=1, default=str))
    _barrier()
    return result


# ------------------------------------------------------------------------------------------- eval / predict
def _eval_trainer(config: TrainConfig, checkpoint: str | os.PathLike) -> tuple[VLPeftTrainer, _Assembled]:
    plan = validate_config(config, for_training=False)
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise ConfigError(f"--checkpoint: folder {str(folder)!r} does not exist")
    problem = weights_problem(folder)  # before any model is loaded
    if problem is not None:
        raise ConfigError(f"--checkpoint: {folder} cannot be loaded: {problem}")
    assembled = _assemble(config, plan, checkpoint=folder)
    args = _training_arguments(config, plan, has_eval=False)
    trainer_class = assembled.task.extras.get("trainer_class", VLPeftTrainer)
    trainer = trainer_class(model=assembled.model, args=args, data_collator=assembled.task.collate,
                            task=assembled.task)
    return trainer, assembled


def _split_dataset(task: TaskBinding, split: str) -> Any:
    if split not in ("eval", "test", "train"):
        raise ConfigError(f"split: expected 'eval', 'test' or 'train', got {split!r}")
    dataset = {"eval": task.eval_dataset, "test": task.test_dataset, "train": task.train_dataset}[split]
    if dataset is None:
        raise ConfigError(f"task.{split}: no {split} file is configured")
    return dataset


def evaluate(config: TrainConfig, checkpoint: str | os.PathLike, split: str = "eval") -> dict[str, float]:
    """Metrics of a trained run/checkpoint on ``task.<split>`` (``{metric: value}``)."""
    trainer, assembled = _eval_trainer(config, checkpoint)
    values = trainer.evaluate(_split_dataset(assembled.task, split), metric_key_prefix=split)
    return {k[len(split) + 1 :]: v for k, v in values.items() if k.startswith(f"{split}_")}


def predict(
    config: TrainConfig, checkpoint: str | os.PathLike, split: str = "test", output: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Predictions of a trained run/checkpoint on ``task.<split>`` in the official submission format
    (VQA ``[{"question_id", "answer"}]``, COCO ``[{"image_id", "caption"}]``, SNLI-VE ``[{"pair_id", "label"}]``),
    optionally written to ``output`` as JSON."""
    trainer, assembled = _eval_trainer(config, checkpoint)
    records = trainer.predict_task(_split_dataset(assembled.task, split))
    if output is not None and trainer.is_world_process_zero():
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, json.dumps(records, indent=1))
    return records


def resolved_config_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as a plain mapping (for logs and reports)."""
    return config_to_dict(config)
