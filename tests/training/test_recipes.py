"""Every recipe in configs/ runs for 2 steps with its model swapped for the tiny twin it declares
(``model.tiny_twin``) and tiny generated data in the recipe's task format; everything else (method and its
options, framing, answer weighting, inference mode, optimiser) stays as the recipe says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _training_data import write_caption_data, write_chat_data, write_snli_ve_data, write_vqa_data
from test_tasks_gqa_nlvr2 import write_gqa, write_nlvr2

from vlpeft.training import load_config, run_training
from vlpeft.training.config import use_tiny_twin

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-data")
    return {"caption": write_caption_data(root / "caption", 4, 2), "vqa": write_vqa_data(root / "vqa", 4, 2),
            "snli_ve": write_snli_ve_data(root / "snli_ve", 4, 2), "chat": write_chat_data(root / "chat", 4, 2),
            "gqa": write_gqa(root / "gqa", 4, 2), "nlvr2": write_nlvr2(root / "nlvr2")}


def _multitask_overrides(recipe: Path, data: dict[str, dict[str, str]]) -> list[str]:
    """``task.tasks`` of a multi-task recipe with each sub-task's files replaced by the generated ones of its type
    (names, prompts and every other sub-task key kept); ``task.max_length`` raised for the chat twin's template
    (NLVR2's two images)."""
    tasks = []
    for entry in load_config(recipe).task.tasks:
        files = dict(item.split("=", 1) for item in _data_overrides(entry["type"], data[entry["type"]]))
        tasks.append({**entry, **{key.split(".", 1)[1]: value for key, value in files.items()}})
    return [f"task.tasks={json.dumps(tasks)}", f"task.images={data['vqa']['images']}", "task.max_length=256"]


def _data_overrides(task: str, files: dict[str, str]) -> list[str]:
    if task == "chat":
        return [f"task.train={files['llava_train']}", f"task.eval={files['messages_val']}",
                f"task.test={files['messages_val']}", f"task.images={files['images']}"]
    evaluation = files.get("val", files.get("dev", files.get("testdev")))
    out = [f"task.train={files['train']}", f"task.eval={evaluation}", f"task.test={evaluation}",
           f"task.images={files['images']}"]
    if task == "vqa":
        out += [f"task.train_annotations={files['train_annotations']}",
                f"task.eval_annotations={files['val_annotations']}",
                f"task.test_annotations={files['val_annotations']}", f"task.answer_list={files['answer_list']}"]
    return out


def test_every_recipe_is_covered():
    assert len(CONFIGS) >= 11
    families = {load_config(path).model.tiny_twin for path in CONFIGS}
    assert {"blip_caption", "vit_roberta", "vit_gpt2", "llava"} <= families


@pytest.mark.parametrize("recipe", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_runs_two_steps_on_its_tiny_twin(recipe, data, tmp_path):
    task = load_config(recipe).task.type
    files = _multitask_overrides(recipe, data) if task == "multitask" else _data_overrides(task, data[task])
    overrides = files + [
        "optim.max_steps=2", "optim.batch_size=2", "optim.eval_batch_size=4", "optim.gradient_accumulation_steps=1",
        "optim.warmup_steps=0", "eval.strategy=no", "eval.max_new_tokens=3", "eval.min_new_tokens=0",
        "eval.num_beams=2", f"run.output_dir={tmp_path / 'run'}", "run.report_to=[csv]", "run.progress_bar=false",
    ]
    config = use_tiny_twin(load_config(recipe, overrides))
    original = load_config(recipe)
    assert config.method == original.method and config.task.framing == original.task.framing
    result = run_training(config)
    assert result.global_step == 2
    assert result.metric in result.metrics["eval"] and result.metric in result.metrics["test"]
    assert 0 < result.trainable_params < result.total_params or original.method.type == "full"
    run_dir = tmp_path / "run"
    assert (run_dir / "metrics.json").is_file() and (run_dir / "config.yaml").is_file()
    predictions = json.loads((run_dir / "predictions_test.json").read_text())
    if task == "multitask":  # each sub-task's own predictions, tagged with its name, and its own main metric
        names = [entry["name"] for entry in original.task.tasks]
        assert {p["task"] for p in predictions} == set(names)
        assert all(any(k.startswith(f"{name}_") for k in result.metrics["test"]) for name in names)
        return
    key = {"vqa": "question_id", "snli_ve": "pair_id", "caption": "image_id", "chat": "id"}[task]
    assert len(predictions) == 2 and all(key in p for p in predictions)
