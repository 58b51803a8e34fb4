"""Cross-field and file-system checks of a :class:`TrainConfig`, run before any model or data is loaded."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlpeft.tasks.layouts import LAYOUTS
from vlpeft.training.config import ConfigError, TrainConfig
from vlpeft.training.image_pairs import TWO_IMAGE_TASKS, two_image_problem
from vlpeft.training.methods import resolve_method_options
from vlpeft.training.models import check_model_options, resolve_family
from vlpeft.training.multitask import validate_multitask
from vlpeft.training.task_binding import (
    CLASSIFIER_FAMILIES,
    DEFAULT_METRICS,
    GENERATIVE_TRAINING_FAMILIES,
    allowed_inference,
    default_framing,
)

__all__ = ["ValidatedPlan", "check_output_dir", "resolved_method_settings", "validate_config"]


@dataclass
class ValidatedPlan:
    """What validation resolved: the model family, the method's config object, and the selection metric."""

    family: str
    method_config: Any
    metric: str


def _check_file(config: TrainConfig, key: str, value: str | None, *, folder: bool = False) -> None:
    if value is None:
        return
    path = config.resolve_path(value)
    ok = path.is_dir() if folder else path.is_file()
    if not ok:
        kind = "folder" if folder else "file"
        raise ConfigError(f"{key}: {kind} {str(path)!r} does not exist")


def check_output_dir(config: TrainConfig) -> Path:
    """``run.output_dir`` resolved, after checking that a run can write there: the folder (or, when it does not exist
    yet, its nearest existing parent, where it will be created) is a folder and a probe file can be created and
    removed in it. Permissions are tested by writing, not by mode bits, so ACLs, read-only mounts and root are
    judged as the run would meet them.

    Raises:
        ConfigError: naming ``run.output_dir``, the path and why it cannot be written.
    """
    path = config.resolve_path(config.run.output_dir)
    existing = path
    while not existing.exists() and not existing.is_symlink() and existing.parent != existing:
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():
        raise ConfigError(f"run.output_dir: {str(path)!r} cannot be created: {str(existing)!r} is a broken symbolic "
                          "link")
    if not existing.is_dir():
        where = "is a file, not a folder" if existing == path else f"cannot be created: {str(existing)!r} is a file"
        raise ConfigError(f"run.output_dir: {str(path)!r} {where}; choose another run.output_dir")
    try:
        handle, probe = tempfile.mkstemp(prefix=".vlpeft-write-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        what = "is not writable" if existing == path else f"cannot be created in {str(existing)!r}"
        raise ConfigError(f"run.output_dir: {str(path)!r} {what} ({error.strerror or error}); fix its permissions "
                          "or choose another run.output_dir") from error
    return path


def _validate_task(config: TrainConfig, family: str, for_training: bool) -> None:
    """The checks of the ``task`` section of a single-task config (also run on each multi-task sub-task)."""
    task, ev = config.task, config.eval
    if for_training and task.train is None:
        raise ConfigError("task.train: a training file is required for `vlpeft train`")
    if ev.strategy != "no" and task.eval is None:
        raise ConfigError(f"task.eval: eval.strategy={ev.strategy!r} needs an evaluation file (or eval.strategy: no)")
    for key in ("train", "eval", "test", "train_annotations", "eval_annotations", "test_annotations", "answer_list"):
        if task.type == "chat" and key in ("train", "eval", "test") and getattr(task, key) is not None:
            path = config.resolve_path(getattr(task, key))
            if not (path.is_file() or path.is_dir()):  # a datasets.save_to_disk folder is data too
                raise ConfigError(f"task.{key}: file or folder {str(path)!r} does not exist")
            continue
        _check_file(config, f"task.{key}", getattr(task, key))
    if task.images is None and task.type != "chat":
        raise ConfigError("task.images: an image folder is required")
    _check_file(config, "task.images", task.images, folder=True)
    chat_model = LAYOUTS.get(family) is not None and LAYOUTS[family].sequence == "chat_template"
    if task.type == "chat" and not chat_model:
        raise ConfigError(f"task.type: 'chat' (conversation data) needs a model driven by its chat template, got "
                          f"model family {family!r}; use an image-text-to-text chat model (model.name) or a chat "
                          "twin (model.tiny)")
    if task.type in TWO_IMAGE_TASKS:
        problem = two_image_problem(config, family)
        if problem is not None:
            raise ConfigError(problem)
    if task.framing is None:
        task.framing = default_framing(family)
    layout = LAYOUTS.get(family)
    if task.framing == "generative" and not (layout is not None and layout.trains_generatively):
        raise ConfigError(
            f"task.framing: the generative framing needs a model family in {list(GENERATIVE_TRAINING_FAMILIES)}, "
            f"got {family!r}"
        )
    if task.framing == "discriminative" and not (layout is not None and layout.classifier):
        raise ConfigError(
            f"task.framing: the discriminative framing needs a classifier model family in {list(CLASSIFIER_FAMILIES)}, "
            f"got {family!r}"
        )
    modes = allowed_inference(task.type, task.framing, family)
    if not modes:
        raise ConfigError(f"task.type: task {task.type!r} is not available with the {task.framing} framing of "
                          f"model family {family!r}")
    if task.inference is not None and task.inference not in modes:
        raise ConfigError(
            f"task.inference: {task.inference!r} is not available for task {task.type!r} with model family "
            f"{family!r}; allowed: {list(modes)}"
        )
    weighted_vqa = task.type == "vqa" and task.answer_weighting != "most_common"
    if weighted_vqa and layout is not None and layout.model_computes_loss:
        model_class = (layout.model_class or family).rsplit(":", 1)[-1]
        raise ConfigError(f"task.answer_weighting: {model_class} computes its own mean loss; use 'most_common' "
                          f"with model family {family!r} (or a blip_caption model for 'release')")
    if task.max_length < 2:
        raise ConfigError(f"task.max_length: must be >= 2, got {task.max_length}")


def validate_config(config: TrainConfig, *, for_training: bool = True) -> ValidatedPlan:
    """Check everything that can be checked without loading a model; fills in ``task.framing`` when unset.

    Raises:
        ConfigError: naming the offending key and the allowed values.
    """
    task, optim, ev, run = config.task, config.optim, config.eval, config.run
    family = resolve_family(config)
    check_model_options(config, family)

    # --- task and data
    if task.type == "multitask":
        if task.framing is None:
            task.framing = "generative"
        validate_multitask(config, family, for_training, _validate_task)
    else:
        if task.tasks:
            raise ConfigError(f"task.tasks: sub-tasks are only read with task.type 'multitask', got {task.type!r}")
        _validate_task(config, family, for_training)

    # --- optimisation
    for key in ("learning_rate", "num_epochs"):
        if getattr(optim, key) <= 0 and not (key == "num_epochs" and optim.max_steps > 0):
            raise ConfigError(f"optim.{key}: must be > 0, got {getattr(optim, key)}")
    for key in ("batch_size", "gradient_accumulation_steps"):
        if getattr(optim, key) < 1:
            raise ConfigError(f"optim.{key}: must be >= 1, got {getattr(optim, key)}")
    if not 0.0 <= optim.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio: must be in [0, 1), got {optim.warmup_ratio}")
    if not 0.0 <= optim.label_smoothing < 1.0:
        raise ConfigError(f"optim.label_smoothing: must be in [0, 1), got {optim.label_smoothing}")
    if optim.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay: must be >= 0, got {optim.weight_decay}")

    # --- evaluation and checkpoints
    metric = ev.metric or DEFAULT_METRICS[task.type]
    if ev.strategy == "steps" and ev.steps < 1:
        raise ConfigError(f"eval.steps: must be >= 1 with eval.strategy: steps, got {ev.steps}")
    if ev.early_stopping_patience < 0:
        raise ConfigError(f"eval.early_stopping_patience: must be >= 0, got {ev.early_stopping_patience}")
    if ev.early_stopping_patience and ev.strategy == "no":
        raise ConfigError("eval.early_stopping_patience: early stopping needs eval.strategy 'steps' or 'epoch'")
    if ev.num_beams < 1 or ev.max_new_tokens < 1 or ev.rank_top_k < 1:
        raise ConfigError("eval.num_beams, eval.max_new_tokens and eval.rank_top_k must be >= 1")
    if run.save_total_limit < 2:
        raise ConfigError(
            f"run.save_total_limit: must be >= 2 so a corrupt last checkpoint has a fallback, got {run.save_total_limit}"
        )
    if ev.strategy == "steps" and run.save_steps and run.save_steps % ev.steps:
        raise ConfigError(
            f"run.save_steps: {run.save_steps} must be a multiple of eval.steps={ev.steps} (best-checkpoint selection)"
        )
    if run.resume not in ("auto", "never"):
        _check_file(config, "run.resume", run.resume, folder=True)
    if for_training:
        check_output_dir(config)

    # --- precision
    if run.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("run.precision: fp16 needs a CUDA device; use fp32 or bf16 on this machine")
    if run.precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("run.precision: this GPU does not support bf16; use fp32 or fp16")

    # --- method (also checks method/model compatibility)
    method_config = resolve_method_options(config.method.type, config.method.options, task.type, family)
    return ValidatedPlan(family=family, method_config=method_config, metric=metric)


def resolved_method_settings(config: TrainConfig) -> dict[str, Any]:
    """``config.method`` with every default of the library resolved, as plain JSON values: the PEFT config's
    ``to_dict()`` (the checked options for full fine-tuning). Digests of a run's settings include it (the sweep's
    ``config_digest``, the demo's fingerprints), so that a changed library default, say the p-adapter paper
    variant's mu0, is never mistaken for the same run. A new config field changes it too: digests err on the side
    of training again. Needs no data and no model, only the model family.

    Raises:
        ConfigError: as :func:`~vlpeft.training.methods.resolve_method_options`.
    """
    resolved = resolve_method_options(config.method.type, dict(config.method.options), config.task.type,
                                      resolve_family(config))
    return _json_values(resolved.to_dict() if hasattr(resolved, "to_dict") else resolved)


def _json_values(value: Any) -> Any:
    """``value`` with sets as sorted lists and every other non-JSON leaf as its ``str`` (a stable digest input:
    the order of a set of strings changes between processes)."""
    if isinstance(value, dict):
        return {str(k): _json_values(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_json_values(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_json_values(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
