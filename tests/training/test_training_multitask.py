"""Multi-task training in one run (``task.type: multitask``, vlpeft.training.multitask): config validation naming
``task.tasks[i].<key>``, VL-Adapter's batch mixing rule, and 2-step runs with per-task evaluation."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from _training_data import write_caption_data, write_snli_ve_data, write_vqa_data
from test_tasks_gqa_nlvr2 import write_gqa, write_nlvr2

from vlpeft.training import evaluate, run_training
from vlpeft.training.config import ConfigError, config_from_dict
from vlpeft.training.multitask import (
    MultiTaskCollator,
    MultiTaskDataset,
    TaskBatchSampler,
    subtasks,
)
from vlpeft.training.validation import validate_config


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("multitask-data")
    return {"vqa": write_vqa_data(root / "vqa", 4, 2), "caption": write_caption_data(root / "caption", 4, 2),
            "gqa": write_gqa(root / "gqa", 4, 2), "nlvr2": write_nlvr2(root / "nlvr2"),
            "snli_ve": write_snli_ve_data(root / "snli_ve", 4, 2)}


def _vqa(files: dict[str, str]) -> dict[str, Any]:
    return {"type": "vqa", "train": files["train"], "train_annotations": files["train_annotations"],
            "eval": files["val"], "eval_annotations": files["val_annotations"], "images": files["images"],
            "answer_list": files["answer_list"], "prompt": "vqa: {question}"}


def _caption(files: dict[str, str]) -> dict[str, Any]:
    return {"type": "caption", "train": files["train"], "eval": files["val"], "images": files["images"],
            "prompt": "caption:"}


def _gqa(files: dict[str, str]) -> dict[str, Any]:
    return {"type": "gqa", "train": files["train"], "eval": files["testdev"], "images": files["images"],
            "prompt": "gqa: {question}"}


def _snli_ve(files: dict[str, str]) -> dict[str, Any]:
    return {"type": "snli_ve", "train": files["train"], "eval": files["dev"], "images": files["images"]}


def _nlvr2(files: dict[str, str]) -> dict[str, Any]:
    return {"type": "nlvr2", "train": files["train"], "eval": files["dev"], "images": files["images"]}


def _config(tasks: list[dict[str, Any]], output_dir: Path, model: str = "blip_caption", **task: Any):
    return config_from_dict({
        "model": {"tiny": model},
        "method": {"type": "lora", "r": 4, "lora_alpha": 8},
        "task": {"type": "multitask", "max_length": 48, "tasks": tasks, **task},
        "optim": {"learning_rate": 1e-3, "max_steps": 2, "batch_size": 2},
        "eval": {"strategy": "steps", "steps": 2, "max_new_tokens": 3, "java": "no"},
        "run": {"output_dir": str(output_dir), "seed": 3, "logging_steps": 1, "progress_bar": False,
                "report_to": ["csv"]},
    })


# ----------------------------------------------------------------------------------------------- validation
def test_subtasks_inherit_and_are_named(data, tmp_path):
    config = _config([_vqa(data["vqa"]), {**_caption(data["caption"]), "name": "coco"}], tmp_path,
                     max_length=33)
    found = subtasks(config)
    assert [name for name, _ in found] == ["vqa", "coco"]
    assert all(sub.task.max_length == 33 for _, sub in found)
    assert found[0][1].task.prompt == "vqa: {question}" and found[1][1].task.type == "caption"
    assert validate_config(config).metric == "multitask_average"


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t[1].update(type="multitask"), r"task\.tasks\[1\]\.type: 'multitask' is not one of"),
    (lambda t: t[1].update(type="chat"), r"task\.tasks\[1\]\.type: 'chat' is not one of"),
    (lambda t: t[0].update(bogus=1), r"unknown key task\.tasks\[0\]\.bogus"),
    (lambda t: t[0].update(max_length="long"), r"task\.tasks\[0\]\.max_length: expected int"),
    (lambda t: t[1].update(train="/nonexistent/captions.json"), r"task\.tasks\[1\]\.train: file '/nonexistent"),
    (lambda t: t[0].pop("type"), r"task\.tasks\[0\]\.type: every sub-task needs a type"),
    (lambda t: t[1].update(name="vqa"), r"task\.tasks\[1\]\.name: 'vqa' is used by an earlier sub-task"),
    (lambda t: t[0].update(inference="classify"), r"task\.tasks\[0\]\.inference: 'classify' is not available"),
    (lambda t: t[1].pop("eval"), r"task\.tasks\[1\]\.eval: eval\.strategy='steps' needs an evaluation file"),
])
def test_bad_subtask_configs_name_the_subtask_key(data, tmp_path, change, message):
    tasks = [_vqa(data["vqa"]), _caption(data["caption"])]
    change(tasks)
    with pytest.raises(ConfigError, match=message):
        validate_config(_config(tasks, tmp_path))


def test_multitask_config_errors(data, tmp_path):
    with pytest.raises(ConfigError, match=r"task\.tasks: task\.type 'multitask' needs a non-empty list"):
        validate_config(_config([], tmp_path))
    with pytest.raises(ConfigError, match=r"task\.tasks\[0\]: expected dict"):
        validate_config(_config(["vqa"], tmp_path))
    single = _config([_vqa(data["vqa"])], tmp_path)
    single.task.type = "caption"
    with pytest.raises(ConfigError, match=r"task\.tasks: sub-tasks are only read with task\.type 'multitask'"):
        validate_config(single)
    # NLVR2 (two images per sample) only on families that take both; classifier composites cannot generate captions
    with pytest.raises(ConfigError, match=r"task\.tasks\[1\]\.type: 'nlvr2' has two images.*model\.tiny 'git'"):
        validate_config(_config([_vqa(data["vqa"]), _nlvr2(data["nlvr2"])], tmp_path, model="git"))
    with pytest.raises(ConfigError, match=r"task\.tasks\[0\]\.framing: the generative framing needs"):
        validate_config(_config([_vqa(data["vqa"]), _caption(data["caption"])], tmp_path, model="vit_roberta"))
    with pytest.raises(ConfigError, match=r"task\.framing: multi-task runs share one model"):
        validate_config(_config([_vqa(data["vqa"])], tmp_path, model="vit_roberta", framing="discriminative"))


# ----------------------------------------------------------------------------------------------- mixing rule
def test_mixing_rule_is_vl_adapters_one_task_per_batch_all_batches_once_per_epoch():
    sizes, batch = [10, 3, 7], 4
    sampler = TaskBatchSampler(sizes, batch, seed=5)
    offsets = [0, 10, 13]
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == sum(math.ceil(n / batch) for n in sizes) == 6
        order = sampler.task_order()
        # each batch from one task; each task contributes ceil(n_k / batch) batches ...
        for task, indices in zip(order, batches, strict=True):
            assert all(offsets[task] <= i < offsets[task] + sizes[task] for i in indices)
            assert 1 <= len(indices) <= batch
        assert Counter(order) == {0: 3, 1: 1, 2: 2}
        # ... and every example is used exactly once per epoch
        assert sorted(i for b in batches for i in b) == list(range(sum(sizes)))
    # the task order is shuffled (not task by task), reproducibly per (seed, epoch), and changes between epochs
    orders = [sampler.task_order(epoch) for epoch in range(6)]
    assert orders[0] == TaskBatchSampler(sizes, batch, seed=5).task_order(0)
    assert len({tuple(o) for o in orders}) > 1
    assert any(o != sorted(o) for o in orders)
    assert list(TaskBatchSampler(sizes, batch, shuffle=False)) == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12], [13, 14, 15, 16], [17, 18, 19]]


@pytest.mark.parametrize("processes", [2, 3])
def test_on_several_processes_every_process_trains_the_same_task_at_each_step(processes):
    """accelerate shards the batch sampler (batch i to process i % n): every step's batches are of one task, full
    size, and together the processes cover every example of every task in each epoch."""
    from accelerate.data_loader import BatchSamplerShard

    sizes, batch = [10, 3, 7], 2
    sampler = TaskBatchSampler(sizes, batch, seed=1, num_replicas=processes)
    sampler.set_epoch(1)
    offsets = [0, 10, 13]
    shards = [list(BatchSamplerShard(sampler, num_processes=processes, process_index=p)) for p in range(processes)]
    assert len({len(shard) for shard in shards}) == 1 and len(shards[0]) == len(sampler) // processes

    def task_of(indices: list[int]) -> int:
        (task,) = {max(k for k in range(3) if i >= offsets[k]) for i in indices}
        return task

    steps = list(zip(*shards, strict=True))
    assert all(len({task_of(b) for b in step}) == 1 and all(len(b) == batch for b in step) for step in steps)
    covered = {i for step in steps for b in step for i in b}
    assert covered == set(range(sum(sizes)))
    per_task = Counter(task_of(step[0]) for step in steps)
    assert per_task == {k: math.ceil(math.ceil(n / batch) / processes) for k, n in enumerate(sizes)}


def test_a_steps_loss_is_the_mean_of_its_micro_batches_own_task_losses():
    """Token counts and question counts are not summed together: each micro-batch is normalised by its own task's
    count, then the step averages over its micro-batches (count 1 each)."""
    from vlpeft.tasks.losses import TrainingObjective
    from vlpeft.training.multitask import MultiTaskObjective

    class Sum(TrainingObjective):  # loss = sum of the "logits" / count, count = number of label entries
        def count(self, batch):
            return torch.tensor(batch["labels"].numel())

        def __call__(self, outputs, labels, info, num_items):
            return outputs.sum() / num_items

    objective = MultiTaskObjective([Sum(), Sum()], ["a", "b"])
    assert int(objective.count({"labels": torch.zeros(5), "task_index": torch.tensor(1)})) == 1
    objective.active = 0
    first = objective(torch.tensor([2.0, 4.0]), torch.zeros(2), {}, torch.tensor(2))  # own mean 3, two micro-batches
    objective.active = 1
    second = objective(torch.tensor([9.0]), torch.zeros(1), {}, torch.tensor(2))  # own mean 9
    assert float(first + second) == pytest.approx((3.0 + 9.0) / 2)


def test_collator_refuses_a_mixed_batch():
    dataset = MultiTaskDataset(["a", "b"], [[{"x": 1}], [{"x": 2}]])
    collate = MultiTaskCollator([lambda items: {"n": torch.tensor(len(items))}] * 2)
    assert int(collate([dataset[1]])["task_index"]) == 1
    with pytest.raises(ValueError, match="one task"):
        collate([dataset[0], dataset[1]])


# ----------------------------------------------------------------------------------------------- runs
@pytest.mark.parametrize(("model", "names"), [("blip_caption", ("vqa", "caption", "snli_ve")),
                                              ("qwen2_vl", ("vqa", "gqa", "nlvr2", "caption"))])
def test_multitask_run_reports_each_tasks_metric_and_the_average(data, tmp_path, model, names, monkeypatch):
    from vlpeft.training import multitask

    makers = {"vqa": _vqa, "caption": _caption, "gqa": _gqa, "nlvr2": _nlvr2, "snli_ve": _snli_ve}
    tasks = [makers[name](data[name]) for name in names]
    config = _config(tasks, tmp_path / "run", model=model,
                     **({"max_length": 256} if model == "qwen2_vl" else {}))
    seen: list[int] = []  # the task of every training batch the trainer gets
    original = multitask.MultiTaskTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append(int(inputs["task_index"]))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(multitask.MultiTaskTrainer, "compute_loss", spy)
    result = run_training(config)
    assert result.global_step == 2 and result.metric == "multitask_average"
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["eval"]
    mains = {"vqa": "vqa_accuracy", "caption": "CIDEr", "gqa": "accuracy", "nlvr2": "accuracy", "snli_ve": "accuracy"}
    for name in names:
        assert f"{name}_{mains[name]}" in saved
    expected = sum(saved[f"{n}_{mains[n]}"] * (100 if n == "caption" else 1) for n in names) / len(names)
    assert saved["multitask_average"] == pytest.approx(expected)
    assert result.metric_value == pytest.approx(expected)
    # the first two batches follow the sampler's epoch-0 order
    sizes = [len(part) for part in _train_parts(config)]
    assert seen == TaskBatchSampler(sizes, 2, seed=3).task_order(0)[:2]
    predictions = json.loads((tmp_path / "run" / "predictions_eval.json").read_text())
    assert {p["task"] for p in predictions} == set(names)
    # `vlpeft evaluate` on the run folder: the same per-task metrics from the saved adapter
    again = evaluate(config, tmp_path / "run")
    assert again["multitask_average"] == pytest.approx(saved["multitask_average"])


def _train_parts(config):
    from vlpeft.training.task_binding import load_datasets

    return load_datasets(config, image_check="exists")[0].parts


def test_a_two_epoch_run_trains_the_batches_in_the_mixing_rules_order(data, tmp_path, monkeypatch):
    """Every batch the trainer gets, over two epochs: one task per batch, each epoch all ceil(n_k / b) batches of
    every task in the sampler's shuffled order for that epoch (the order changes with the epoch)."""
    from vlpeft.training import multitask

    config = _config([_vqa(data["vqa"]), _caption(data["caption"]), _gqa(data["gqa"])], tmp_path / "run")
    config.optim.max_steps, config.optim.num_epochs, config.eval.strategy = -1, 2, "no"
    seen: list[int] = []
    original = multitask.MultiTaskTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append(int(inputs["task_index"]))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(multitask.MultiTaskTrainer, "compute_loss", spy)
    result = run_training(config)
    sizes = [len(part) for part in _train_parts(config)]
    sampler = TaskBatchSampler(sizes, 2, seed=3)
    assert sizes == [4, 8, 4]  # captions train on (image, caption) pairs: 4 images x 2 captions
    assert result.global_step == len(seen) == 2 * len(sampler) == 16
    assert seen == sampler.task_order(0) + sampler.task_order(1)
    assert Counter(seen[:8]) == Counter(seen[8:]) == {0: 2, 1: 4, 2: 2}


def test_a_resumed_multitask_run_continues_the_mixing_order_mid_epoch(data, tmp_path, monkeypatch):
    """Stopped after checkpoint-2 of a 6-batch epoch, the resumed run trains exactly the batches (tasks and losses)
    that an uninterrupted run trains at steps 3..6."""
    from transformers import TrainerCallback

    from vlpeft.training import multitask

    seen: list[int] = []
    original = multitask.MultiTaskTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append(int(inputs["task_index"]))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(multitask.MultiTaskTrainer, "compute_loss", spy)

    def config_for(folder: str):
        config = _config([_vqa(data["vqa"]), _caption(data["caption"])], tmp_path / folder)
        config.optim.max_steps, config.eval.strategy, config.run.save_steps = 6, "no", 2
        return config

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt("simulated preemption after checkpoint-2")

    reference = run_training(config_for("reference"))
    reference_order, seen[:] = list(seen), []
    with pytest.raises(KeyboardInterrupt):
        run_training(config_for("resumed"), callbacks=[Crash()])
    assert seen == reference_order[:2]
    seen.clear()
    resumed = run_training(config_for("resumed"))
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-2")
    assert seen == reference_order[2:] and resumed.global_step == reference.global_step == 6

    def losses(run_dir: Path) -> list[float]:
        state = json.loads((run_dir / "trainer_state.json").read_text())
        return [entry["loss"] for entry in state["log_history"] if "loss" in entry]

    assert losses(tmp_path / "resumed")[-4:] == pytest.approx(losses(tmp_path / "reference")[-4:])


def test_a_multitask_run_on_two_processes_trains_and_evaluates_every_task(data, tmp_path):
    """``torchrun --nproc_per_node=2`` (gloo, CPU): training with the sharded task batches, evaluation sharded over
    the processes and gathered: every eval example of every task is predicted once and scored per task."""
    import os
    import subprocess
    import sys

    import yaml

    from vlpeft.training.config import config_to_dict

    config = _config([_vqa(data["vqa"]), _caption(data["caption"])], tmp_path / "run")
    config.optim.max_steps, config.optim.batch_size = 3, 1
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vlpeft.cli",
           "train", str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["global_step"] == 3
    assert {"vqa_vqa_accuracy", "caption_CIDEr", "multitask_average"} <= set(saved["metrics"]["eval"])
    predictions = json.loads((tmp_path / "run" / "predictions_eval.json").read_text())
    assert Counter(p["task"] for p in predictions) == {"vqa": 2, "caption": 2}
