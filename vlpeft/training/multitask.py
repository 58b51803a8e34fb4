"""Multi-task training in one run (``task.type: multitask``), as in VL-Adapter's multi-task setting.

One shared PEFT module (adapter, LoRA, routed variants...) is trained on several tasks at once; each task keeps its own
data, prompt, collator, training objective, inference and metric, built by the ordinary single-task bindings
(:func:`vlpeft.training.task_binding.build_task`) from a sub-config. The config::

    task:
      type: multitask
      images: data/coco/images          # inherited by the sub-tasks that do not set their own
      tasks:
        - {type: vqa, train: ..., eval: ..., prompt: "vqa: {question}"}
        - {type: gqa, train: ..., eval: ..., images: data/gqa/images, prompt: "gqa: {question}"}
        - {type: nlvr2, train: ..., eval: ..., images: data/nlvr2/images}
        - {type: caption, train: ..., eval: ..., prompt: "caption:"}

Each entry of ``task.tasks`` takes the :class:`~vlpeft.training.config.TaskConfig` keys, plus an optional ``name``
(default: its ``type``; names must be unique, they prefix the metrics). ``images``, ``max_length``, ``image_size``,
``max_train_samples``, ``max_eval_samples``, ``bad_input``, ``answer_weighting`` and ``framing`` are inherited from
``task`` when an entry does not set them. Errors name ``task.tasks[i].<key>``.

**Mixing rule** (VL-Adapter, ``ylsung/VL_adapter`` ``VL-T5/src/multitask_data.py`` ``MultitaskLoader`` with its
default ``multitask_sampling: roundrobin``; routing.md §6.3 takes the VL-Adapter multi-task setting as the CLIP-BART
base): every batch holds examples of **one task only**. Each epoch, every task's training set is shuffled and cut
into batches of ``optim.batch_size`` (the last one may be smaller); the epoch is the union of all tasks' batches,
i.e. each task contributes ``ceil(n_task / batch_size)`` batches, and the order of the task labels is shuffled
(seeded by ``run.seed`` and the epoch). Tasks are therefore seen in proportion to their number of batches and every
training example is used exactly once per epoch (:class:`TaskBatchSampler`). ``optim.batch_size`` is the per-task
batch of one process. On several processes every process trains the same task at each step on its share of that
task's data (as VL-Adapter's per-process loaders with the same shuffled task order). The loss of a step is the mean,
over its micro-batches (accumulation and processes), of each micro-batch's own task loss
(:class:`MultiTaskObjective`).

**Evaluation** runs each task's own inference and metric on its own eval set and reports them as
``<name>_<metric>`` (so ``eval_vqa_vqa_accuracy``, ``eval_gqa_accuracy``, ``eval_nlvr2_accuracy``,
``eval_caption_CIDEr`` in ``metrics.json`` / the logs), plus ``multitask_average``: the mean of each task's main
metric, with caption metrics (pycocoevalcap scale, CIDEr 1.15) multiplied by 100 so that the average is VL-Adapter's
Table 1 "Avg" (VQAv2, GQA, NLVR2 accuracy and COCO CIDEr in percent). ``multitask_average`` is the default
selection metric (``eval.metric``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vlpeft.tasks.losses import TrainingObjective
from vlpeft.training.config import CHOICES, ConfigError, TaskConfig, TrainConfig, _coerce
from vlpeft.training.task_binding import (
    TaskBinding,
    answer_list,
    build_task,
    check_answer_coverage,
    load_datasets,
)
from vlpeft.training.trainer import VLPeftTrainer

__all__ = [
    "AVERAGE_METRIC",
    "INHERITED_KEYS",
    "MultiTaskDataset",
    "MultiTaskObjective",
    "MultiTaskTrainer",
    "SUBTASK_TYPES",
    "TaskBatchSampler",
    "build_multitask",
    "load_multitask_datasets",
    "subtasks",
    "validate_multitask",
]

AVERAGE_METRIC = "multitask_average"
#: Task types a multi-task run may combine.
SUBTASK_TYPES = ("vqa", "gqa", "nlvr2", "caption", "snli_ve")
#: ``task`` keys a sub-task inherits when it does not set them.
INHERITED_KEYS = ("images", "max_length", "image_size", "max_train_samples", "max_eval_samples", "bad_input",
                  "answer_weighting", "framing")
#: Metrics reported on the pycocoevalcap scale (multiplied by 100 in ``multitask_average``).
_CAPTION_SCALE = ("CIDEr", "Bleu", "METEOR", "ROUGE_L", "SPICE")


# ----------------------------------------------------------------------------------------------- config
def subtasks(config: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """``(name, sub-config)`` per entry of ``task.tasks``: the run's config with ``task`` replaced by the entry
    (keys and types checked; inherited keys filled in).

    Raises:
        ConfigError: naming ``task.tasks[i].<key>``.
    """
    parent = config.task
    if not parent.tasks:
        raise ConfigError("task.tasks: task.type 'multitask' needs a non-empty list of sub-task configs, e.g. "
                          "[{type: vqa, train: ..., eval: ...}, {type: caption, ...}]")
    hints = typing.get_type_hints(TaskConfig)
    allowed = [f.name for f in dataclasses.fields(TaskConfig) if f.name != "tasks"] + ["name"]
    out: list[tuple[str, TrainConfig]] = []
    for i, entry in enumerate(parent.tasks):
        where = f"task.tasks[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping of task keys (type, train, eval, ...), got {entry!r}")
        values = dict(entry)
        name = values.pop("name", None)
        if "type" not in values:
            raise ConfigError(f"{where}.type: every sub-task needs a type, one of {list(SUBTASK_TYPES)}")
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in allowed:
                raise ConfigError(f"unknown key {where}.{key}; allowed keys in {where}: {allowed}")
            choices = CHOICES.get(("task", key))
            if key == "type":
                choices = SUBTASK_TYPES
            checked = _coerce(value, hints[key], f"{where}.{key}")
            if choices is not None and checked is not None and checked not in choices:
                raise ConfigError(f"{where}.{key}: {checked!r} is not one of {list(choices)}")
            kwargs[key] = checked
        for key in INHERITED_KEYS:
            if key not in kwargs:
                kwargs[key] = getattr(parent, key)
        name = kwargs["type"] if name is None else name
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_]*", name):
            raise ConfigError(f"{where}.name: {name!r} must be letters, digits and underscores (it prefixes the "
                              "task's metrics)")
        if name in [n for n, _ in out]:
            raise ConfigError(f"{where}.name: {name!r} is used by an earlier sub-task; give each task a unique name")
        out.append((name, dataclasses.replace(config, task=TaskConfig(**kwargs))))
    return out


def _rename(error: ConfigError, index: int) -> ConfigError:
    return ConfigError(re.sub(r"\btask\.(?!tasks\[)", f"task.tasks[{index}].", str(error)))


def validate_multitask(config: TrainConfig, family: str, for_training: bool,
                       validate_task: Callable[[TrainConfig, str, bool], None]) -> list[tuple[str, TrainConfig]]:
    """Check ``task.tasks`` before any model loads: each sub-task through ``validate_task`` (the single-task
    checks, with their ``task.<key>`` messages renamed ``task.tasks[i].<key>``), and the combination (one shared
    model: the generative framing for every sub-task)."""
    if config.task.framing == "discriminative":
        raise ConfigError("task.framing: multi-task runs share one model and need every task to be generated "
                          "(the generative framing); a classifier head has one output space per task")
    found = subtasks(config)
    for i, (_, sub) in enumerate(found):
        try:
            validate_task(sub, family, for_training)
        except ConfigError as error:
            raise _rename(error, i) from error
        if sub.task.framing != "generative":
            raise ConfigError(f"task.tasks[{i}].framing: multi-task runs train every task generatively (one shared "
                              f"model, per-task prompts); model family {family!r} is a classifier composite "
                              "(use a generative family, e.g. blip_caption, a chat model or the CLIP-BART "
                              "composite)")
    return found


# ------------------------------------------------------------------------------------------------ data
class MultiTaskDataset(Dataset):
    """The concatenation of the sub-tasks' datasets of one split; item ``i`` is ``{"task_index": k, "item": ...}``.

    Attributes:
        names: task names; parts: the sub-datasets (same order).
    """

    def __init__(self, names: Sequence[str], parts: Sequence[Any]) -> None:
        self.names = list(names)
        self.parts = list(parts)
        self.offsets = [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + len(part))

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(task index, index within that task's dataset) of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        for k in range(len(self.parts)):
            if index < self.offsets[k + 1]:
                return k, index - self.offsets[k]
        raise IndexError(index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        k, local = self.locate(index)
        return {"task_index": k, "item": self.parts[k][local]}


class TaskBatchSampler:
    """VL-Adapter's multi-task batch order (see the module docstring): per epoch, each task's indices shuffled and
    cut into batches of ``batch_size``; the epoch's sequence of task labels (``ceil(n_k / batch_size)`` of task
    ``k``) shuffled; each batch drawn from one task. Yields lists of global indices of a :class:`MultiTaskDataset`.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 num_replicas: int = 1) -> None:
        if any(n < 1 for n in sizes):
            raise ValueError(f"every task needs at least one training example, got sizes {list(sizes)}")
        self.sizes = list(sizes)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.epoch = 0
        self.offsets = [sum(self.sizes[:k]) for k in range(len(self.sizes))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _task_batches(self, n: int) -> int:
        batches = math.ceil(n / self.batch_size)
        return batches if self.num_replicas == 1 else math.ceil(batches / self.num_replicas) * self.num_replicas

    def __len__(self) -> int:
        return sum(self._task_batches(n) for n in self.sizes)

    def task_order(self, epoch: int | None = None) -> list[int]:
        """The task index of each batch of ``epoch`` (default: the current one), in order."""
        return [k for k, _ in self.batches(self.epoch if epoch is None else epoch)]

    def batches(self, epoch: int) -> list[tuple[int, list[int]]]:
        """``(task index, global indices)`` of every batch of ``epoch``, in order.

        With ``num_replicas`` n > 1 (torchrun / accelerate: the sampler is then sharded by accelerate, batch ``i``
        to process ``i % n``) the batches come in groups of n batches of one task, so that every process trains
        the same task at each step as in VL-Adapter (one ``MultitaskLoader`` per process, same shuffled task order,
        each task's data split over the processes); a task's indices wrap around to fill its last group with full
        batches, as ``DistributedSampler`` pads.
        """
        replicas = self.num_replicas
        per_task: list[list[list[int]]] = []
        for k, n in enumerate(self.sizes):
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 101 + k)
                order = torch.randperm(n, generator=generator).tolist()
            else:
                order = list(range(n))
            if replicas > 1:
                total = self._task_batches(n) * self.batch_size
                order = (order * math.ceil(total / n))[:total]
            start = self.offsets[k]
            chunks = [[start + i for i in order[j:j + self.batch_size]] for j in range(0, len(order), self.batch_size)]
            per_task.append(chunks)
        labels = [k for k, chunks in enumerate(per_task) for _ in range(len(chunks) // replicas)]
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(labels)
        position = [0] * len(per_task)
        out = []
        for k in labels:
            for _ in range(replicas):
                out.append((k, per_task[k][position[k]]))
                position[k] += 1
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for _, indices in self.batches(self.epoch):
            yield indices


class MultiTaskCollator:
    """Collate a one-task batch with that task's own collator; adds ``task_index`` (a 0-dim tensor)."""

    def __init__(self, collators: Sequence[Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]]) -> None:
        self.collators = list(collators)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        tasks = {item["task_index"] for item in items}
        if len(tasks) != 1:
            raise ValueError(f"a multi-task batch must come from one task, got tasks {sorted(tasks)} (use the "
                             "TaskBatchSampler)")
        (k,) = tasks
        batch = dict(self.collators[k]([item["item"] for item in items]))
        batch["task_index"] = torch.tensor(k)
        return batch


class MultiTaskObjective(TrainingObjective):
    """Each task's own objective, picked by the batch's ``task_index`` (or :attr:`active` for a batch without one).

    The tasks' losses are normalised by different counts (target tokens, questions, examples), so a multi-task
    step is the **mean over its micro-batches (all processes) of each micro-batch's own task loss**, as VL-Adapter
    averages per-batch losses over accumulation steps and processes: :meth:`count` is 1 per micro-batch, and a
    micro-batch's loss is its task objective normalised by the micro-batch's own count, divided by the number
    of micro-batches of the global batch. With one process and no accumulation this is exactly the task's loss.
    """

    def __init__(self, objectives: Sequence[TrainingObjective], names: Sequence[str]) -> None:
        self.objectives = list(objectives)
        modes = {objective.model_computes_loss for objective in self.objectives}
        if len(modes) != 1:
            raise ConfigError(f"task.tasks: the sub-tasks {list(names)} need different loss paths (the model's own "
                              "loss for some, vlpeft's for others); this model family cannot train them together")
        self.model_computes_loss = modes.pop()
        self.active = 0

    def count(self, batch: dict[str, Any]) -> torch.Tensor:
        return torch.tensor(1)

    def __call__(self, outputs: Any, labels: torch.Tensor, info: dict[str, torch.Tensor],
                 num_items: torch.Tensor | int) -> torch.Tensor:
        objective = self.objectives[self.active]
        own = objective.count({"labels": labels, **info})
        loss = objective(outputs, labels, info, own)
        return loss / (num_items.to(loss.device, loss.dtype) if isinstance(num_items, torch.Tensor) else num_items)


class MultiTaskTrainer(VLPeftTrainer):
    """:class:`VLPeftTrainer` with the VL-Adapter batch order (:class:`TaskBatchSampler`) and per-task losses."""

    def get_train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset
        sampler = TaskBatchSampler([len(part) for part in dataset.parts], self._train_batch_size, seed=self.args.seed,
                                   num_replicas=self.args.world_size)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers,
                            pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        inputs = dict(inputs)
        index = inputs.pop("task_index", None)
        if index is not None:
            self.task.objective.active = int(index)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


# -------------------------------------------------------------------------------------------- bindings
def load_multitask_datasets(config: TrainConfig, image_check: str, policy: Any) -> tuple[Any, Any, Any]:
    """(train, eval, test) :class:`MultiTaskDataset` s; a split is ``None`` when no sub-task has it."""
    names, loaded = [], []
    for i, (name, sub) in enumerate(subtasks(config)):
        try:
            loaded.append(load_datasets(sub, image_check=image_check, policy=policy))
        except ConfigError as error:
            raise _rename(error, i) from error
        names.append(name)
    out = []
    for split in range(3):
        present = [(name, parts[split]) for name, parts in zip(names, loaded, strict=True) if parts[split] is not None]
        out.append(MultiTaskDataset([n for n, _ in present], [d for _, d in present]) if present else None)
    return tuple(out)  # type: ignore[return-value]


def _scaled(metric: str, value: float) -> float:
    return 100.0 * value if metric.split("_")[0] in _CAPTION_SCALE else value


def build_multitask(config: TrainConfig, processor: Any, family: str, model_config: Any,
                    datasets: tuple[Any, Any, Any]) -> Any:
    """One :class:`~vlpeft.training.task_binding.TaskBinding` over the sub-tasks' own bindings."""
    train, evaluation, test = datasets
    subs = subtasks(config)
    bindings = {}
    for i, (name, sub) in enumerate(subs):
        parts = [None, None, None]
        for j, split in enumerate((train, evaluation, test)):
            if split is not None and name in split.names:
                parts[j] = split.parts[split.names.index(name)]
        answers = answer_list(sub, parts[0]) if sub.task.type in ("vqa", "gqa") else None
        coverage = check_answer_coverage(sub, tuple(parts), answers, training=False)
        if coverage is not None and int(os.environ.get("RANK", "0")) == 0:
            print(f"vlpeft: {name}: {coverage.line()}", file=sys.stderr)
        try:
            bindings[name] = build_task(sub, processor, family, model_config, tuple(parts), answers)
        except ConfigError as error:
            raise _rename(error, i) from error
    names = [name for name, _ in subs]
    train_names = train.names if train is not None else names
    collate = MultiTaskCollator([bindings[name].collate for name in train_names])
    objective = MultiTaskObjective([bindings[name].objective for name in train_names], train_names)

    def predict(model: Any, dataset: MultiTaskDataset, indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
        wanted = range(len(dataset)) if indices is None else indices
        per_task: dict[int, list[int]] = {}
        for index in wanted:
            k, local = dataset.locate(index)
            per_task.setdefault(k, []).append(local)
        records = []
        for k, local in sorted(per_task.items()):
            name = dataset.names[k]
            for record in bindings[name].predict(model, dataset.parts[k], local):
                records.append({"task": name, **record})
        return records

    def score(records: list[dict[str, Any]], dataset: MultiTaskDataset) -> dict[str, float]:
        out: dict[str, float] = {}
        mains = []
        for k, name in enumerate(dataset.names):
            mine = [{key: v for key, v in r.items() if key != "task"} for r in records if r.get("task") == name]
            if not mine:
                continue
            binding = bindings[name]
            scores = binding.score(mine, dataset.parts[k])
            out.update({f"{name}_{key}": float(v) for key, v in scores.items()})
            if binding.metric in scores:
                mains.append(_scaled(binding.metric, float(scores[binding.metric])))
        if mains:
            out[AVERAGE_METRIC] = sum(mains) / len(mains)
        return out

    return TaskBinding(train, evaluation, test, collate, objective, predict, score, AVERAGE_METRIC, None,
                       {"trainer_class": MultiTaskTrainer, "bindings": bindings})
