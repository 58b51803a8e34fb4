"""GQA (balanced question files) and NLVR2 (official JSON Lines, image pairs): loaders on fixtures in the official
layouts, metrics against hand-computed numbers, bad records under raise/skip, and 2-step training on a chat twin."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _training_data import COLOURS
from PIL import Image

from vlpeft.metrics.exact_match import gqa_accuracy
from vlpeft.metrics.nlvr2 import nlvr2_scores, sentence_group
from vlpeft.tasks.bad_input import BadInputError, BadInputPolicy
from vlpeft.tasks.gqa import GQADataset
from vlpeft.tasks.nlvr2 import NLVR2Dataset, image_names
from vlpeft.training import ConfigError, config_from_dict, run_training
from vlpeft.training.validation import validate_config

NAMES = list(COLOURS)


def _png(path: Path, colour: str, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), COLOURS[colour]).save(path, format=fmt)


# ------------------------------------------------------------------------------------------------ fixtures
def write_gqa(root: Path, n_train: int = 4, n_eval: int = 3) -> dict[str, str]:
    """``images/<imageId>.jpg`` and ``{train,testdev}_balanced_questions.json`` (dict keyed by question id)."""
    files = {"images": str(root / "images")}
    for split, count, first in (("train", n_train, 0), ("testdev", n_eval, 100)):
        questions: dict[str, Any] = {}
        for k in range(count):
            colour = NAMES[k % len(NAMES)]
            image_id = f"n{first + k}" if k % 2 else str(2354786 + first + k)
            _png(root / "images" / f"{image_id}.jpg", colour, "JPEG")
            questions[str(20968379 + first + k)] = {
                "semantic": [], "entailed": [], "equivalent": [str(20968379 + first + k)], "question":
                "What color is the square?", "imageId": image_id, "isBalanced": True, "groups":
                {"global": "color", "local": "10q-square_color"}, "answer": colour,
                "semanticStr": "select: square ->query: color", "annotations": {"answer": {}, "question": {},
                                                                                "fullAnswer": {}},
                "types": {"detailed": "objAttr", "semantic": "attr", "structural": "query"},
                "fullAnswer": f"The square is {colour}."}
        path = root / f"{split}_balanced_questions.json"
        path.write_text(json.dumps(questions))
        files[split] = str(path)
    return files


def write_nlvr2(root: Path) -> dict[str, str]:
    """``train.json`` / ``dev.json`` (JSON Lines) and images named from the identifier: train images in
    ``images/train/<directory>/``, dev images in ``images/dev/``."""
    files = {"images": str(root / "images")}
    rows = {"train": [("train-10171-0-0", "True", "58"), ("train-10171-1-0", "False", "58"),
                      ("train-10172-0-1", "True", "3"), ("train-10172-2-1", "False", "3")],
            "dev": [("dev-850-0-0", "True", None), ("dev-850-1-0", "False", None), ("dev-851-0-0", "True", None)]}
    for split, examples in rows.items():
        lines = []
        for k, (identifier, label, directory) in enumerate(examples):
            folder = root / "images" / split / (directory or "")
            for name, colour in zip(image_names(identifier), (NAMES[k % 4], NAMES[(k + 1) % 4]), strict=True):
                _png(folder / name, colour)
            record = {"validation": {"W1": "True"}, "sentence": f"The left image has a {NAMES[k % 4]} square.",
                      "left_url": "https://example.org/a.jpg", "writer": "103", "label": label,
                      "right_url": "https://example.org/b.jpg", "synset": "n02114100", "query": "square 2",
                      "identifier": identifier, "extra_validations": {}}
            if directory is not None:
                record["directory"] = directory
            lines.append(json.dumps(record))
        path = root / f"{split}.json"
        path.write_text("\n".join(lines) + "\n")
        files[split] = str(path)
    return files


# ------------------------------------------------------------------------------------------------- metrics
def test_gqa_accuracy_by_hand():
    gold = {"1": "yes", "2": "right", "3": "t-shirt", "4": "red"}
    predicted = {"1": "Yes.", "2": "left", "3": "T-shirt", "4": "red"}
    # normalised (VQA normalisation of both sides): yes=yes, t shirt=t shirt, red=red -> 3/4
    assert gqa_accuracy(predicted, gold).overall == pytest.approx(75.0)
    # official eval.py (raw equality): only "red" -> 1/4
    assert gqa_accuracy(predicted, gold, normalize=False).overall == pytest.approx(25.0)
    groups = {"1": "verify", "2": "query", "3": "query", "4": "query"}
    per = gqa_accuracy(predicted, gold, groups=groups).per_group
    assert per == {"query": pytest.approx(200 / 3), "verify": pytest.approx(100.0)}
    with pytest.raises(ValueError, match="no gold answer"):
        gqa_accuracy({"9": "x"}, gold)


def test_nlvr2_accuracy_and_consistency_by_hand():
    labels = {"dev-1-0-0": "True", "dev-1-1-0": "False", "dev-1-2-0": "True",  # sentence dev-1--0, 3 pairs
              "dev-1-0-1": "False", "dev-1-3-1": "True",                          # sentence dev-1--1, 2 pairs
              "dev-2-0-0": "True"}                                                # sentence dev-2--0
    predicted = dict(labels)
    predicted["dev-1-3-1"] = "false"  # one wrong; lower case is compared case-insensitively, as officially
    score = nlvr2_scores(predicted, labels)
    assert score.accuracy == pytest.approx(500 / 6)  # 5 of 6
    assert score.consistency == pytest.approx(200 / 3)  # 2 of 3 sentences wholly right
    assert score.num_sentences == 3
    assert sentence_group("dev-1-3-1") == "dev-1--1"  # the official script blanks pair_id, not the last field
    with pytest.raises(ValueError, match="no prediction"):
        nlvr2_scores({}, labels)
    with pytest.raises(ValueError, match="not True or False"):
        nlvr2_scores({**predicted, "dev-2-0-0": "maybe"}, labels)


# ------------------------------------------------------------------------------------------------- loaders
def test_gqa_loader_reads_the_balanced_layout(tmp_path):
    files = write_gqa(tmp_path)
    data = GQADataset.from_balanced(files["testdev"], files["images"], image_check="decode")
    assert len(data) == 3
    item = data[1]
    assert item["question_id"] == "20968480" and item["image_id"] == "n101"
    assert item["answers"] == [NAMES[1]] and item["answer_scores"] == {NAMES[1]: 1.0}
    assert item["structural_type"] == "query" and item["full_answer"].startswith("The square")
    assert data.records[1].image_path.name == "n101.jpg"  # by name: n101 and 101 are different GQA images
    assert data.records[0].image_path.name == "2354886.jpg"


def test_gqa_bad_records_raise_naming_file_and_question_or_are_skipped(tmp_path):
    files = write_gqa(tmp_path)
    questions = json.loads(Path(files["train"]).read_text())
    keys = list(questions)
    del questions[keys[0]]["question"]
    questions[keys[1]]["imageId"] = "n999999"
    questions[keys[2]]["answer"] = 7
    bad = tmp_path / "bad_balanced_questions.json"
    bad.write_text(json.dumps(questions))
    with pytest.raises(BadInputError) as error:
        GQADataset.from_balanced(bad, files["images"])
    assert "bad_balanced_questions.json" in str(error.value) and repr(keys[0]) in str(error.value)
    assert "'question'" in str(error.value) and "task.bad_input" in str(error.value)
    policy = BadInputPolicy("skip")
    data = GQADataset.from_balanced(bad, files["images"], policy=policy)
    assert len(data) == 1
    assert policy.counts == {"malformed_record": 2, "missing_image": 1}
    assert any("n999999" in m for m in policy.examples["missing_image"])


def test_nlvr2_loader_finds_both_images_from_the_identifier(tmp_path):
    files = write_nlvr2(tmp_path)
    train = NLVR2Dataset.from_jsonl(files["train"], files["images"], image_check="decode")
    assert [r.image_paths[1].name for r in train.records][:1] == ["train-10171-0-img1.png"]
    assert train.records[0].image_paths[0].parent.name == "58"  # images/train/<directory>/
    dev = NLVR2Dataset.from_jsonl(files["dev"], files["images"])
    item = dev[0]
    assert len(item["images"]) == 2 and item["image"] is item["images"][0]
    assert item["label"] == "True" and item["label_id"] == 1 and item["identifier"] == "dev-850-0-0"
    assert item["images"][0].getpixel((0, 0)) != item["images"][1].getpixel((0, 0))


def test_nlvr2_bad_records_raise_naming_file_line_and_identifier_or_are_skipped(tmp_path):
    files = write_nlvr2(tmp_path)
    lines = Path(files["dev"]).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    records[0]["label"] = "maybe"
    records[1]["identifier"] = "dev-850-1"
    records[2]["identifier"] = "dev-999-0-0"  # no such images
    bad = tmp_path / "bad_dev.json"
    bad.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n" + lines[0] + "\n")
    with pytest.raises(BadInputError) as error:
        NLVR2Dataset.from_jsonl(bad, files["images"])
    message = str(error.value)
    assert "bad_dev.json" in message and "line 1" in message and "dev-850-0-0" in message and "maybe" in message
    policy = BadInputPolicy("skip")
    data = NLVR2Dataset.from_jsonl(bad, files["images"], policy=policy)
    assert len(data) == 1
    assert policy.counts == {"unknown_label": 1, "malformed_record": 2, "missing_image": 1}
    assert any("dev-999-0-img0.png" in m for m in policy.examples["missing_image"])


# ------------------------------------------------------------------------------------------------ training
def _config(task: dict[str, Any], output_dir: Path, method: dict[str, Any] | None = None,
            model: dict[str, Any] | None = None):
    return config_from_dict({
        "model": model or {"tiny": "qwen2_vl"},
        "method": method or {"type": "lora", "r": 4, "lora_alpha": 8},
        "task": {"max_length": 256, **task},
        "optim": {"learning_rate": 1e-3, "max_steps": 2, "batch_size": 2},
        "eval": {"strategy": "steps", "steps": 2, "max_new_tokens": 3, "java": "no"},
        "run": {"output_dir": str(output_dir), "seed": 3, "logging_steps": 1, "progress_bar": False,
                "report_to": ["csv"]},
    })


@pytest.mark.parametrize(("model", "inference"), [("qwen2_vl", None), ("qwen2_vl", "rank"),
                                                  ("blip_caption", None)])
def test_gqa_trains_two_steps(model, inference, tmp_path):
    """On a chat twin (generation, and ranking over the training answers) and on a BLIP-style family (GQA has one
    image per question, so every generative family takes it)."""
    files = write_gqa(tmp_path / "data")
    task = {"type": "gqa", "train": files["train"], "eval": files["testdev"], "images": files["images"],
            "inference": inference}
    config = _config(task, tmp_path / "run", model={"tiny": model})
    result = run_training(config)
    assert result.global_step == 2 and result.metric == "accuracy"
    evaluation = result.metrics["eval"]
    assert 0.0 <= evaluation["accuracy"] <= 100.0 and "accuracy_strict" in evaluation
    assert "accuracy_query" in evaluation


@pytest.mark.parametrize("twin", ["qwen2_vl", "smolvlm", "gemma3"])
def test_nlvr2_trains_two_steps_on_a_chat_twin_with_both_images_and_routing(twin, tmp_path):
    files = write_nlvr2(tmp_path / "data")
    config = _config({"type": "nlvr2", "train": files["train"], "eval": files["dev"], "images": files["images"]},
                     tmp_path / "run", method={"type": "routed_lora", "r": 4, "lora_alpha": 8, "routing": "matmul"},
                     model={"tiny": twin})
    result = run_training(config)
    assert result.global_step == 2 and result.metric == "accuracy"
    evaluation = result.metrics["eval"]
    assert evaluation["accuracy"] in (pytest.approx(0.0), pytest.approx(100 / 3), pytest.approx(200 / 3),
                                      pytest.approx(100.0))
    assert 0.0 <= evaluation["consistency"] <= 100.0  # dev: 2 sentences (dev-850--0 over 2 pairs, dev-851--0)


def test_nlvr2_puts_both_images_in_one_user_turn(tmp_path):
    from vlpeft.tasks.chat_collator import ChatCollator
    from vlpeft.tasks.chat_tasks import ChatTaskCollator
    from vlpeft.tasks.nlvr2 import DEFAULT_NLVR2_PROMPT, nlvr2_examples
    from vlpeft.testing.twins import build_twin

    files = write_nlvr2(tmp_path)
    dev = NLVR2Dataset.from_jsonl(files["dev"], files["images"])
    twin = build_twin("qwen2_vl")
    collate = ChatTaskCollator(ChatCollator(twin.processor, 512),
                               lambda items: nlvr2_examples(items, DEFAULT_NLVR2_PROMPT))
    batch = collate([dev[0], dev[1]])
    assert batch["image_grid_thw"].shape[0] == 4  # two images for each of the two samples
    image_token = twin.model.config.image_token_id
    per_row = (batch["input_ids"] == image_token).sum(dim=1)
    assert torch.equal(per_row, per_row[:1].expand(2)) and int(per_row[0]) == int(
        batch["image_grid_thw"][:2].prod(dim=1).sum()) // 4  # both images' placeholders in each row

    # routing's x_R: each sample's placeholder rows, i.e. both images' visual tokens (mean pooling pools both)
    import peft

    import vlpeft
    from vlpeft.glue.families import detect_family
    from vlpeft.glue.visual_features import find_visual_contexts

    model = twin.model.eval()
    family = detect_family(model)
    wrapped = peft.get_peft_model(model, vlpeft.RoutedLoraConfig(routing="matmul", pooling="mean"))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        wrapped.get_base_model()(**inputs)
    context = find_visual_contexts(wrapped)[0]
    x_r, mask = context.visual_input(family.visual_feature_module, "none", 2, requester="test",
                                     width=model.config.get_text_config().hidden_size)
    rows = mask.sum(dim=1).tolist() if mask is not None else [x_r.shape[1]] * x_r.shape[0]  # no mask: none padded
    assert rows == per_row.tolist()


@pytest.mark.parametrize("family", ["llava", "git", "vit_gpt2"])
def test_nlvr2_is_refused_for_single_image_families(family, tmp_path):
    """Families that read one image per sequence (and take NLVR2's pair in no other way) are refused before any
    model loads, naming the model, its family and the task."""
    files = write_nlvr2(tmp_path / "data")
    config = _config({"type": "nlvr2", "train": files["train"], "eval": files["dev"], "images": files["images"]},
                     tmp_path / "run", model={"tiny": family})
    with pytest.raises(ConfigError, match=rf"task\.type: 'nlvr2' has two images per sample, which model\.tiny "
                                          rf"'{family}' \(model family '{family}'\) cannot take"):
        validate_config(config)


def test_train_check_deep_names_a_corrupt_nlvr2_image_or_counts_it(tmp_path, capsys):
    import yaml

    from vlpeft.cli import main

    files = write_nlvr2(tmp_path / "data")
    broken = Path(files["images"]) / "dev" / "dev-851-0-img1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    config = {"model": {"tiny": "qwen2_vl"}, "method": {"type": "lora", "r": 4},
              "task": {"type": "nlvr2", "train": files["train"], "eval": files["dev"], "images": files["images"]},
              "run": {"output_dir": str(tmp_path / "run")}}
    path = tmp_path / "nlvr2.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--check", "--deep"]) == 2
    error = capsys.readouterr().err
    assert "dev-851-0-img1.png" in error and "dev-851-0-0" in error and "dev.json" in error
    assert main(["train", str(path), "--check", "--deep", "--set", "task.bad_input=skip"]) == 0
    out = capsys.readouterr().out
    assert "eval 2 records" in out and "corrupt_image: 1" in out
