"""Bad inputs get a clear, early error through the CLI (issue #18, items 2-6): ``task.bad_input: warn``, data errors
under ``raise`` (``vlpeft train: error: ...``, exit status 2, naming the file and the record and the config key
``task.bad_input``), config files that are not a mapping, an ``output_dir`` that cannot be written, and an
``answer_list`` that misses training or evaluation answers. Every refusal happens before any model is loaded and
leaves what a previous run wrote untouched."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from _training_data import tiny_caption_config, write_config, write_vqa_data

from vlpeft.cli import main
from vlpeft.tasks.bad_input import BadInputError, BadInputPolicy
from vlpeft.training import run as run_module
from vlpeft.training.config import ConfigError, load_config

PREVIOUS = "previous run's metrics"


def _vqa_config(data: dict[str, str], output_dir: Path, **task: Any) -> dict[str, Any]:
    """A 2-step ViT + RoBERTa classifier run (LoRA) on ``write_vqa_data`` files, no evaluation during training."""
    config = tiny_caption_config(data, output_dir)
    config["model"] = {"tiny": "vit_roberta"}
    config["method"] = {"type": "lora", "r": 4, "lora_alpha": 4}
    config["task"] = {"type": "vqa", "train": data["train"], "train_annotations": data["train_annotations"],
                      "eval": data["val"], "eval_annotations": data["val_annotations"], "images": data["images"],
                      "answer_list": data["answer_list"], "max_length": 12, **task}
    config["optim"].update({"max_steps": 2, "batch_size": 2})
    config["eval"].update({"strategy": "no", "load_best_at_end": False})
    return config


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model is loaded (the error must come before)."""
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))


def _previous_run(output_dir: Path) -> Path:
    """An output folder holding what an earlier run wrote; returns the file to check afterwards."""
    output_dir.mkdir(parents=True, exist_ok=True)
    marker = output_dir / "metrics.json"
    marker.write_text(PREVIOUS)
    return marker


# ------------------------------------------------------------------------------------------ item 6: not a mapping
@pytest.mark.parametrize("text, kind", [("- model\n- task\n", "got a list"), ("just a string\n", "got a str"),
                                        ("42\n", "got a int")])
@pytest.mark.parametrize("overrides", [[], ["--set", "optim.batch_size=2"]])
def test_config_that_is_not_a_mapping_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        text: str, kind: str, overrides: list[str]) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    for command in (["train", str(path), "--check"], ["train", str(path)]):
        assert main([*command, *overrides]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vlpeft train: error: ") and "Traceback" not in err
        assert str(path) in err and "must be a YAML mapping of sections" in err and kind in err
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(path, ["optim.batch_size=2"])


# ----------------------------------------------------------------------------------------------- item 4: warn
def test_warn_policy_skips_counts_and_warns_once_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    policy = BadInputPolicy("warn")
    assert policy.skipping
    with caplog.at_level(logging.WARNING, logger="vlpeft.tasks.bad_input"):
        policy.handle("missing_image", "file a.json record 1: no image")
        policy.handle("missing_image", "file a.json record 2: no image")
        policy.handle("malformed_record", "file a.json record 3: missing field 'question'")
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned
    assert "missing_image" in warned[0] and "record 1" in warned[0] and "task.bad_input: warn" in warned[0]
    assert "malformed_record" in warned[1] and "record 3" in warned[1]
    assert policy.counts == {"missing_image": 2, "malformed_record": 1} and policy.total == 3
    with pytest.raises(ValueError, match=r"on_error must be one of \['raise', 'skip', 'warn'\]"):
        BadInputPolicy("ignore")  # type: ignore[arg-type]


def test_warn_trains_without_the_bad_records(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             caplog: pytest.LogCaptureFixture) -> None:
    torch.set_num_threads(1)
    data = write_vqa_data(tmp_path / "vqa", 4, 2)
    os.remove(next(iter(sorted((tmp_path / "vqa" / "images" / "train2014").iterdir()))))
    path = write_config(tmp_path / "c.yaml", _vqa_config(data, tmp_path / "run", bad_input="warn"))
    assert main(["train", str(path), "--check"]) == 0
    with caplog.at_level(logging.WARNING, logger="vlpeft.tasks.bad_input"):
        assert main(["train", str(path)]) == 0
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "bad input (missing_image), skipped and counted (task.bad_input: warn)" in messages
    assert "question_id 10" in messages and "missing_image: 1" in messages  # the warning, then the count
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------------- item 5: data errors under raise
def _break(case: str, data: dict[str, str], root: Path) -> tuple[str, str]:
    """Damage the data as ``case`` says; returns (file the error must name, record it must name)."""
    questions = Path(data["train"])
    if case == "missing_image":
        os.remove(root / "images" / "train2014" / "COCO_train2014_000000000002.png")
        return data["train"], "question_id 20"
    if case == "truncated_json":
        questions.write_text(questions.read_text()[:50])
        return data["train"], "not valid JSON"
    if case == "missing_field":
        content = json.loads(questions.read_text())
        del content["questions"][1]["question"]
        questions.write_text(json.dumps(content))
        return data["train"], "question_id 20: missing field 'question'"
    if case == "empty_questions":
        questions.write_text(json.dumps({"questions": []}))
        return data["train"], "holds no questions"
    if case == "question_without_annotation":
        annotations = Path(data["train_annotations"])
        content = json.loads(annotations.read_text())
        content["annotations"].pop(0)
        annotations.write_text(json.dumps(content))
        return data["train"], f"question_id 10: no annotation in {data['train_annotations']!r}"
    assert case == "truncated_answer_list"
    answers = Path(data["answer_list"])
    answers.write_text(answers.read_text()[:10])
    return data["answer_list"], "task.answer_list"


@pytest.mark.parametrize("case", ["missing_image", "truncated_json", "missing_field", "empty_questions",
                                  "question_without_annotation", "truncated_answer_list"])
def test_data_errors_under_raise_are_clean_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  no_model: None, case: str) -> None:
    data = write_vqa_data(tmp_path / "vqa", 4, 2)
    marker = _previous_run(tmp_path / "run")
    file, record = _break(case, data, tmp_path / "vqa")
    path = write_config(tmp_path / "c.yaml", _vqa_config(data, tmp_path / "run"))
    assert main(["train", str(path), "--check"]) == 2  # --check reads VQA data files (answer-list coverage)
    check = capsys.readouterr().err
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == check
    assert err.startswith("vlpeft train: error: ") and "Traceback" not in err, err
    assert file in err and record in err, err
    if case not in ("truncated_json", "truncated_answer_list"):  # whole-file errors cannot be skipped
        assert "set task.bad_input: skip (or warn) in the config" in err, err
    assert "BadInputPolicy(" not in err
    assert marker.read_text() == PREVIOUS and sorted(p.name for p in marker.parent.iterdir()) == ["metrics.json"]


def test_bad_input_error_names_the_config_key() -> None:
    with pytest.raises(BadInputError, match=r"record 7: no image \(set task.bad_input: skip \(or warn\)") as info:
        BadInputPolicy().handle("missing_image", "record 7: no image")
    assert info.value.reason == "missing_image"


# ------------------------------------------------------------------------------ item 2: unwritable run.output_dir
def _check_and_train(path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """stderr of ``train --check`` and of ``train`` (both must refuse with status 2 and no traceback)."""
    errors = []
    for command in (["train", str(path), "--check"], ["train", str(path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("vlpeft train: error: run.output_dir: ") and "Traceback" not in err, err
        errors.append(err)
    return errors


def test_output_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None) -> None:
    data = write_vqa_data(tmp_path / "vqa", 4, 2)
    taken = tmp_path / "taken"
    taken.write_text(PREVIOUS)
    path = write_config(tmp_path / "c.yaml", _vqa_config(data, taken))
    for err in _check_and_train(path, capsys):
        assert f"{str(taken)!r} is a file, not a folder" in err
    path = write_config(tmp_path / "c.yaml", _vqa_config(data, taken / "run"))
    for err in _check_and_train(path, capsys):
        assert f"{str(taken / 'run')!r} cannot be created: {str(taken)!r} is a file" in err
    assert taken.read_text() == PREVIOUS


def test_output_dir_that_cannot_be_written(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe write fails (simulated, so the test also holds as root, who may write anywhere)."""
    data = write_vqa_data(tmp_path / "vqa", 4, 2)
    marker = _previous_run(tmp_path / "run")
    path = write_config(tmp_path / "c.yaml", _vqa_config(data, tmp_path / "run"))

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("vlpeft.training.validation.tempfile.mkstemp", refuse)
    for err in _check_and_train(path, capsys):
        assert f"{str(tmp_path / 'run')!r} is not writable (Permission denied)" in err
    path = write_config(tmp_path / "c.yaml", _vqa_config(data, tmp_path / "run" / "sub"))
    for err in _check_and_train(path, capsys):
        assert f"cannot be created in {str(tmp_path / 'run')!r} (Permission denied)" in err
    assert marker.read_text() == PREVIOUS and sorted(p.name for p in marker.parent.iterdir()) == ["metrics.json"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes to a chmod 0500 folder anyway (the simulated test above covers root)")
def test_output_dir_without_write_permission(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             no_model: None) -> None:
    data = write_vqa_data(tmp_path / "vqa", 4, 2)
    marker = _previous_run(tmp_path / "run")
    path = write_config(tmp_path / "c.yaml", _vqa_config(data, tmp_path / "run"))
    (tmp_path / "run").chmod(0o500)
    try:
        for err in _check_and_train(path, capsys):
            assert "is not writable" in err
    finally:
        (tmp_path / "run").chmod(0o700)
    assert marker.read_text() == PREVIOUS


def test_writable_output_dir_is_left_as_it_was(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_vqa_data(tmp_path / "vqa", 4, 2)
    path = write_config(tmp_path / "c.yaml", _vqa_config(data, tmp_path / "new" / "run"))
    assert main(["train", str(path), "--check"]) == 0
    assert not (tmp_path / "new").exists()  # --check creates nothing
    marker = _previous_run(tmp_path / "old")
    path = write_config(tmp_path / "c.yaml", _vqa_config(data, tmp_path / "old"))
    assert main(["train", str(path), "--check"]) == 0
    assert sorted(p.name for p in marker.parent.iterdir()) == ["metrics.json"]  # the probe file is gone


# ------------------------------------------------------------------------ item 3: answer_list misses some answers
def _answer_purple(annotations_file: str, count: int) -> None:
    """Give the first ``count`` questions of an annotation file the answer 'purple' (in no answer list)."""
    path = Path(annotations_file)
    content = json.loads(path.read_text())
    for ann in content["annotations"][:count]:
        ann["multiple_choice_answer"] = "purple"
        for answer in ann["answers"]:
            answer["answer"] = "purple"
    path.write_text(json.dumps(content))


def test_classifier_refuses_an_answer_list_missing_most_training_answers(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None) -> None:
    data = write_vqa_data(tmp_path / "vqa", 8, 2)
    Path(data["answer_list"]).write_text(json.dumps(["red", "green"]))  # blue and yellow questions: all-zero targets
    marker = _previous_run(tmp_path / "run")
    path = write_config(tmp_path / "c.yaml", _vqa_config(data, tmp_path / "run"))
    for command in (["train", str(path), "--check"], ["train", str(path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("vlpeft train: error: task.answer_list: 4 of 8 training questions (50.0%) have none "
                              "of their answers among the 2 answers of task.answer_list"), err
        assert "all-zero targets; at most 10% is allowed (MAX_UNANSWERABLE_TRAIN_SHARE" in err
        assert "Traceback" not in err
    assert marker.read_text() == PREVIOUS and sorted(p.name for p in marker.parent.iterdir()) == ["metrics.json"]


def test_classifier_reports_unanswerable_questions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    data = write_vqa_data(tmp_path / "vqa", 12, 4)
    _answer_purple(data["train_annotations"], 1)  # 1 of 12 = 8.3%: below the 10% refusal threshold
    _answer_purple(data["val_annotations"], 3)
    path = write_config(tmp_path / "c.yaml", _vqa_config(data, tmp_path / "run"))
    line = (f"answer list (4 answers, task.answer_list {data['answer_list']!r}): questions with none of their "
            "answers in it: train 1 of 12 (8.3%), eval 3 of 4 (75.0%)")
    assert main(["train", str(path), "--check"]) == 0
    assert line in capsys.readouterr().out
    assert main(["train", str(path)]) == 0
    assert line in capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert metrics["eval"]["unanswerable"] == 3
    assert main(["eval", str(path), "--checkpoint", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out[out.rindex("{\n"):])["unanswerable"] == 3 and "eval 3 of 4 (75.0%)" in err and "train 1 of 12" not in err


def test_ranking_evaluation_counts_unanswerable_questions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    data = write_vqa_data(tmp_path / "vqa", 4, 4)
    _answer_purple(data["val_annotations"], 2)
    config = _vqa_config(data, tmp_path / "run", framing="generative", inference="rank", max_length=16)
    config["model"] = {"tiny": "blip_caption"}
    path = write_config(tmp_path / "c.yaml", config)
    assert main(["train", str(path)]) == 0  # ranking trains on the answers themselves: no refusal
    assert "train 0 of 4 (0.0%), eval 2 of 4 (50.0%)" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert metrics["eval"]["unanswerable"] == 2
    assert metrics["eval"]["vqa_accuracy"] <= 50.0  # the two unanswerable questions score 0
