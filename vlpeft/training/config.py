"""Typed training configuration: YAML -> dataclasses, ``--set a.b=value`` overrides, strict key/type checks.

A run is described by one :class:`TrainConfig` with six sections::

    model:   {name: Salesforce/blip-image-captioning-base}     # or {tiny: blip_caption}
    method:  {type: lora, r: 8, lora_alpha: 16}                 # type + that method's own keys
    task:    {type: caption, train: ..., eval: ..., images: ...}
    optim:   {learning_rate: 3.0e-4, num_epochs: 2, batch_size: 16, ...}
    eval:    {strategy: epoch, num_beams: 5, ...}
    run:     {output_dir: runs/x, seed: 42, precision: fp32, ...}

Loading checks keys and types only (:class:`ConfigError` names the key and the allowed keys/values). Cross-field
and file-system checks live in :mod:`vlpeft.training.validation` and run before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "ModelConfig",
    "MethodConfig",
    "TaskConfig",
    "OptimConfig",
    "EvalConfig",
    "RunConfig",
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "save_config",
    "use_tiny_twin",
    "TASK_TYPES",
    "PRECISIONS",
]

TASK_TYPES = ("vqa", "snli_ve", "caption", "chat", "gqa", "nlvr2", "multitask")
FRAMINGS = ("generative", "discriminative")
INFERENCE_MODES = ("generate", "rank", "classify")
PRECISIONS = ("fp32", "bf16", "fp16")
EVAL_STRATEGIES = ("no", "steps", "epoch")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
REPORTERS = ("tensorboard", "csv")


class ConfigError(ValueError):
    """A configuration problem, raised before any model or data is loaded."""


# ------------------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """Which backbone to fine-tune.

    Exactly one of ``name`` (a Hugging Face hub name or a local directory), ``vision`` + ``text`` (the parts of
    a composite: vlpeft's ViT + RoBERTa/BERT/GPT-2, or CLIP-BART) and ``tiny`` (a tiny random-config family from
    :func:`vlpeft.models.tiny.build_tiny_model`) is set.

    Attributes:
        name: hub name or local path, e.g. ``Salesforce/blip-image-captioning-base``.
        vision / text: hub names or paths of the composite's parts, e.g. ``google/vit-base-patch16-224-in21k`` and
            ``roberta-base``, or ``openai/clip-vit-base-patch32`` and ``facebook/bart-base`` (CLIP-BART).
        options: the composite's config fields (VisionPrefixLMConfig: ``prefix_tokens``, ``head_pooling``...;
            ClipBartConfig: ``num_visual_tokens``, ``downsample_pooling``...); also applied to its tiny twin;
            checked against the family at validation (``vlpeft.training.models.COMPOSITE_FAMILY_OPTIONS``).
        tiny: tiny-config family, e.g. ``blip_caption``.
        tiny_twin: the tiny family that stands in for this model in smoke tests (``vlpeft train --tiny-twin``).
        tiny_overrides: keyword overrides for ``build_tiny_model`` (``hidden_size``, ``num_hidden_layers``...).
        family: vlpeft model family (``vlpeft.glue.families``); inferred from ``tiny``, a local ``config.json``
            or a well-known hub name when left empty.
        processor: processor hub name or local path (default: ``name``; tiny models build one offline).
        revision: hub revision of ``name``.
        attn_implementation: passed to ``from_pretrained`` (e.g. ``eager``, ``sdpa``).
    """

    name: str | None = None
    vision: str | None = None
    text: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    tiny: str | None = None
    tiny_twin: str | None = None
    tiny_overrides: dict[str, Any] = field(default_factory=dict)
    family: str | None = None
    processor: str | None = None
    revision: str | None = None
    attn_implementation: str | None = None


@dataclass
class MethodConfig:
    """The fine-tuning method: ``type`` plus the method's own options (checked against the method's config
    class by :mod:`vlpeft.training.methods`).

    Attributes:
        type: ``full``, ``lora``, ``adapter``, ``p_adapter``, ``routed_lora`` or ``routed_adapter``.
        options: every other key of the ``method:`` section, e.g. ``r``, ``lora_alpha``, ``target_modules``.
    """

    type: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskConfig:
    """Task and data.

    Attributes:
        type: ``vqa``, ``snli_ve``, ``caption``, ``chat`` (conversation data: LLaVA JSON, or JSON / JSONL /
            Parquet / a ``datasets.save_to_disk`` folder with ``messages`` and ``images``; chat-template models),
            ``gqa`` (balanced question JSON; VQA-like, exact match) or ``nlvr2`` (official JSONL, two images per
            sample; chat-template models only) or ``multitask`` (the tasks of ``tasks`` in one run with one shared
            PEFT module, mixed by VL-Adapter's rule; :mod:`vlpeft.training.multitask`).
        tasks: ``multitask`` only: the sub-tasks, a list of mappings with the keys of this section (plus an optional
            ``name``), e.g. ``[{type: vqa, train: ..., eval: ..., prompt: "vqa: {question}"}, {type: caption, ...}]``.
        train / eval / test: annotation files (VQAv2 official question file or Karpathy JSON; SNLI-VE jsonl;
            COCO/Karpathy caption JSON).
        train_annotations / eval_annotations / test_annotations: VQAv2 official annotation files that go with
            the question files above (unused by the other formats).
        images: image folder (searched one level deep, so ``train2014/`` and ``val2014/`` are both found); for
            ``chat`` data the root of relative image paths (default: each data file's folder).
        answer_list: VQA candidate answers (JSON list, or an ``ans2label`` mapping) for ranking / the classifier
            vocabulary (default: built from the training answers).
        framing: ``generative`` (the LM writes the answer) or ``discriminative`` (a classifier head); default:
            ``discriminative`` for the classifier composites (``vit_roberta``, ``vit_bert``), else ``generative``.
        answer_weighting: generative VQA training sequences: ``release`` (one sequence per distinct answer,
            weighted count/10, loss divided by the number of questions; the BLIP / p-adapter release),
            ``scores`` (weight = soft score) or ``most_common`` (one sequence per question, token-mean loss).
        inference: ``generate``, ``rank`` or ``classify`` (default: the task's usual one).
        prompt: text placed before the target (caption prompt, VQA/SNLI-VE template); empty: the task default.
        max_length: maximum text length in tokens.
        image_size: resize edge for images (default: the processor's).
        max_train_samples / max_eval_samples: truncate the datasets (0: use all).
        bad_input: what to do with malformed records: ``raise`` (stop before training, naming the file and record),
            ``skip`` (leave them out and count them per reason) or ``warn`` (as ``skip``, plus a warning the first
            time each reason occurs); see :class:`vlpeft.tasks.bad_input.BadInputPolicy`.
    """

    type: str = "caption"
    train: str | None = None
    eval: str | None = None
    test: str | None = None
    train_annotations: str | None = None
    eval_annotations: str | None = None
    test_annotations: str | None = None
    images: str | None = None
    answer_list: str | None = None
    framing: str | None = None
    answer_weighting: str = "release"
    inference: str | None = None
    prompt: str | None = None
    max_length: int = 40
    image_size: int | None = None
    max_train_samples: int = 0
    max_eval_samples: int = 0
    bad_input: str = "raise"
    tasks: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class OptimConfig:
    """AdamW, schedule and batch sizes.

    Weight decay applies to weights only: biases, norms and p-adapter's p/m offsets are excluded
    (``vlpeft.tuners.param_groups``). ``batch_size`` is per device; the global batch is
    ``batch_size * gradient_accumulation_steps * world_size``. The loss is the target-token cross-entropy
    averaged over every target token of that global batch (optional ``label_smoothing``).
    """

    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    num_epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    label_smoothing: float = 0.0


@dataclass
class EvalConfig:
    """Evaluation during training, model selection and decoding.

    Attributes:
        strategy: ``no``, ``steps`` or ``epoch``.
        steps: evaluate (and save) every this many optimiser steps when ``strategy: steps``.
        metric: metric used to select the best checkpoint (default: the task's main metric).
        early_stopping_patience: stop after this many evaluations without improvement (0: off).
        num_beams / max_new_tokens / min_new_tokens: generation settings.
        rank_top_k: candidates kept after first-token scoring in ``rank`` inference.
        load_best_at_end: load the best checkpoint when training ends (needs ``strategy`` != ``no``).
        java: caption metrics with the official Java PTB tokenizer: ``auto`` (if Java is installed), ``yes``, ``no``.
    """

    strategy: str = "epoch"
    steps: int = 500
    metric: str | None = None
    early_stopping_patience: int = 0
    num_beams: int = 1
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    rank_top_k: int = 32
    load_best_at_end: bool = True
    java: str = "auto"


@dataclass
class RunConfig:
    """Output, checkpoints, precision and reproducibility.

    Attributes:
        output_dir: run folder (adapter, processor, resolved config, metrics, checkpoints, logs).
        seed: seed of initialisation, data order and dropout.
        precision: ``fp32``, ``bf16`` or ``fp16`` (fp16 needs CUDA).
        gradient_checkpointing: recompute activations in backward (non-reentrant).
        save_steps: checkpoint every this many steps (0: at each evaluation, or each epoch without one).
        save_total_limit: keep at most this many checkpoints (>= 2 so a corrupt last one has a fallback).
        logging_steps: log loss/lr every this many steps.
        report_to: loggers (``tensorboard``, ``csv``).
        resume: ``auto`` (resume from the last valid checkpoint in ``output_dir``), ``never``, or a checkpoint path.
        dataloader_num_workers: data-loading worker processes.
        progress_bar: show tqdm progress bars with ETA.
    """

    output_dir: str = "runs/vlpeft"
    seed: int = 42
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    save_steps: int = 0
    save_total_limit: int = 3
    logging_steps: int = 10
    report_to: list[str] = field(default_factory=lambda: ["tensorboard", "csv"])
    resume: str = "auto"
    dataloader_num_workers: int = 0
    progress_bar: bool = True


@dataclass
class TrainConfig:
    """A whole training run (see the module docstring for the YAML layout)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    base_dir: str = field(default=".", metadata={"internal": True})

    def resolve_path(self, value: str | None) -> Path | None:
        """A config path made absolute against ``base_dir`` (the working directory at load time)."""
        if value is None:
            return None
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else Path(self.base_dir) / path


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "method": MethodConfig,
    "task": TaskConfig,
    "optim": OptimConfig,
    "eval": EvalConfig,
    "run": RunConfig,
}

# Allowed values of enumerated string fields: (section, key) -> values.
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("task", "type"): TASK_TYPES,
    ("task", "framing"): FRAMINGS,
    ("task", "answer_weighting"): ("release", "scores", "most_common"),
    ("task", "inference"): INFERENCE_MODES,
    ("task", "bad_input"): ("raise", "skip", "warn"),
    ("optim", "lr_scheduler"): LR_SCHEDULERS,
    ("eval", "strategy"): EVAL_STRATEGIES,
    ("eval", "java"): ("auto", "yes", "no"),
    ("run", "precision"): PRECISIONS,
}


# ------------------------------------------------------------------------------------------- type checking
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
    elif tp is Any:
        return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str) and item_type is str:
            value = [value]
        if isinstance(value, list | tuple):
            return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        raise AssertionError(f"unsupported annotation {tp!r} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _section_from_dict(name: str, cls: type, values: Any) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    if cls is MethodConfig:
        values = dict(values)
        method_type = values.pop("type", MethodConfig.type)
        options = values.pop("options", {}) or {}
        if not isinstance(options, dict):
            raise ConfigError(f"method.options: expected a mapping, got {options!r}")
        return MethodConfig(type=_coerce(method_type, str, "method.type"), options={**options, **values})
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in allowed:
            raise ConfigError(f"unknown key {name}.{key}; allowed keys in {name}: {allowed}")
        choices = CHOICES.get((name, key))
        if choices is not None and isinstance(value, bool):
            value = "yes" if value else "no"  # YAML 1.1 reads a bare no/yes as a boolean
        checked = _coerce(value, hints[key], f"{name}.{key}")
        if choices is not None and checked is not None and checked not in choices:
            raise ConfigError(f"{name}.{key}: {checked!r} is not one of {list(choices)}")
        if key == "report_to":
            bad = [r for r in checked if r not in REPORTERS]
            if bad:
                raise ConfigError(f"run.report_to: unknown logger(s) {bad}; allowed: {list(REPORTERS)}")
        kwargs[key] = checked
    return cls(**kwargs)


def use_tiny_twin(config: TrainConfig) -> TrainConfig:
    """The same run with the model replaced by the tiny twin its recipe declares (``model.tiny_twin``).

    Raises:
        ConfigError: the recipe declares no tiny twin.
    """
    model = config.model
    if model.tiny is not None:
        return config
    if model.tiny_twin is None:
        raise ConfigError("model.tiny_twin: this config declares no tiny twin family (set model.tiny_twin)")
    tiny = dataclasses.replace(model, name=None, vision=None, text=None, processor=None, revision=None,
                               tiny=model.tiny_twin)
    return dataclasses.replace(config, model=tiny)


def config_from_dict(data: dict[str, Any], base_dir: str | os.PathLike = ".") -> TrainConfig:
    """Build a :class:`TrainConfig` from a nested mapping (as read from YAML).

    Raises:
        ConfigError: unknown section/key (the message lists the allowed ones) or a value of the wrong type.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping with sections {list(_SECTIONS)}, got {type(data).__name__}")
    unknown = [k for k in data if k not in _SECTIONS]
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; allowed sections: {list(_SECTIONS)}")
    sections = {name: _section_from_dict(name, cls, data.get(name)) for name, cls in _SECTIONS.items()}
    return TrainConfig(**sections, base_dir=str(base_dir))


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The nested mapping that :func:`config_from_dict` reads back (method options flattened)."""
    out: dict[str, Any] = {}
    for name in _SECTIONS:
        section = getattr(config, name)
        if isinstance(section, MethodConfig):
            out[name] = {"type": section.type, **section.options}
        else:
            out[name] = dataclasses.asdict(section)
    return out


# ---------------------------------------------------------------------------------------------- overrides
def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(
            f"override key {key!r} must be section.key (sections: {list(_SECTIONS)}), e.g. optim.learning_rate"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({error})") from error
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML scalars/lists) to a raw config mapping.

    Keys are checked when the result goes through :func:`config_from_dict`; ``method.<option>`` and nested
    dict keys such as ``model.tiny_overrides.hidden_size`` are allowed.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"--set needs a config mapping of sections {list(_SECTIONS)}, got {type(data).__name__}")
    result = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        parts, value = _parse_override(item)
        if parts[0] not in _SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section {parts[0]!r}; allowed: {list(_SECTIONS)}")
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
            else:
                child = dict(child)
            node[part] = child
            node = child
        node[parts[-1]] = value
    return result


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply ``--set`` overrides, and check keys and types.

    Relative paths in the config (data files, ``run.output_dir``) are relative to the current working
    directory, as for any command-line tool.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    if data is None:  # an empty file: every default
        data = {}
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__} ({data!r:.40})"
        raise ConfigError(f"{path}: a config file must be a YAML mapping of sections {list(_SECTIONS)} "
                          f"(e.g. 'optim: {{learning_rate: 1.0e-4}}'), got {kind}")
    if overrides:
        data = apply_overrides(data, overrides)
    return config_from_dict(data, base_dir=os.getcwd())


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (readable by :func:`load_config`; paths made absolute)."""
    data = config_to_dict(config)
    for key in ("train", "eval", "test", "train_annotations", "eval_annotations", "test_annotations",
                "images", "answer_list"):
        if data["task"][key] is not None:
            data["task"][key] = str(config.resolve_path(data["task"][key]).resolve())
    for entry in data["task"].get("tasks") or []:
        for key in ("train", "eval", "test", "train_annotations", "eval_annotations", "test_annotations",
                    "images", "answer_list"):
            if isinstance(entry, dict) and isinstance(entry.get(key), str):
                entry[key] = str(config.resolve_path(entry[key]).resolve())
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
