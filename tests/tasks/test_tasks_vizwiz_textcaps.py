"""VizWiz-VQA, VizWiz-Captions and TextCaps (issue 21, p-adapter Table 1): loaders on fixtures written in the
official layouts, the official VizWiz accuracy against hand-computed values, caption references as the official
evaluations use them, bad records under raise/skip, and a 2-step run_training per format on tiny BLIP."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from _training_data import write_config
from PIL import Image

from vlpeft.cli import main
from vlpeft.metrics import vqa_soft_score
from vlpeft.metrics.vizwiz import normalize_vizwiz_prediction, vizwiz_accuracy, vizwiz_soft_score
from vlpeft.metrics.vqa_normalize import normalize_answer
from vlpeft.tasks.bad_input import BadInputError, BadInputPolicy
from vlpeft.tasks.textcaps import load_textcaps
from vlpeft.tasks.vizwiz import VizWizVQADataset, load_vizwiz_captions
from vlpeft.tasks.vqa import VQADataset
from vlpeft.training import load_config, run_training
from vlpeft.training.task_binding import _caption_score, _load_vqa, _vqa_score

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}


def _jpg(path: Path, colour: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), COLOURS[colour]).save(path, format="JPEG")


def _answers(*pairs: tuple[str, int]) -> list[dict[str, str]]:
    out = [{"answer": a, "answer_confidence": "yes"} for a, n in pairs for _ in range(n)]
    assert len(out) == 10
    return out


def _vizwiz_vqa_record(image: str, question: str, answers: list[dict[str, str]], answer_type: str,
                       answerable: int) -> dict[str, Any]:
    return {"image": image, "question": question, "answers": answers, "answer_type": answer_type,
            "answerable": answerable}


def write_vizwiz_vqa(root: Path, n_train: int = 4, n_eval: int = 2) -> dict[str, str]:
    """``train.json`` / ``val.json`` / ``test.json`` (VizWiz-VQA layout) and ``images/{train,val,test}/``."""
    names = list(COLOURS)
    files = {"images": str(root / "images")}
    for split, count in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        records = []
        for i in range(count):
            image = f"VizWiz_{split}_{i:08d}.jpg"
            colour = names[i % len(names)]
            _jpg(root / "images" / split / image, colour)
            if split == "test":
                records.append({"image": image, "question": "What colour is this?"})
            elif i % 4 == 3:  # an unanswerable question
                records.append(_vizwiz_vqa_record(image, "What is this?", _answers(("unanswerable", 9), (colour, 1)),
                                                  "unanswerable", 0))
            else:
                records.append(_vizwiz_vqa_record(image, "What colour is this?", _answers((colour, 10)), "other", 1))
        (root / f"{split}.json").write_text(json.dumps(records))
        files[split] = str(root / f"{split}.json")
    return files


REJECTED = "a red square"
PRECANNED = "Quality issues are too severe to recognize visual content."


def write_vizwiz_captions(root: Path, n_train: int = 4, n_eval: int = 2) -> dict[str, str]:
    """VizWiz-Captions ``annotations/{train,val}.json`` and ``images/{train,val}/``: per image 3 kept captions of 7
    words, one rejected caption (3 words) and one pre-canned caption."""
    names = list(COLOURS)
    files = {"images": str(root / "images")}
    ann_id = 0
    offset = 0
    for split, count in (("train", n_train), ("val", n_eval)):
        data: dict[str, Any] = {"info": {}, "images": [], "annotations": []}
        for i in range(count):
            image_id = offset + i  # VizWiz-Captions ids run on across splits
            name = f"VizWiz_{split}_{i:08d}.jpg"
            colour = names[i % len(names)]
            _jpg(root / "images" / split / name, colour)
            data["images"].append({"file_name": name, "vizwiz_url": f"https://example.invalid/{name}",
                                   "id": image_id, "text_detected": False})
            captions = [(f"a {colour} square on a white card", False, False)] * 3
            captions += [(REJECTED, True, False), (PRECANNED, False, True)]
            for caption, rejected, precanned in captions:
                data["annotations"].append({"image_id": image_id, "id": ann_id, "caption": caption,
                                            "is_precanned": precanned, "is_rejected": rejected,
                                            "text_detected": False})
                ann_id += 1
        offset += count
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{split}.json").write_text(json.dumps(data))
        files[split] = str(root / "annotations" / f"{split}.json")
    return files


def write_textcaps(root: Path, n_train: int = 4, n_eval: int = 2) -> dict[str, str]:
    """``TextCaps_0.1_{train,val}.json`` (one entry per caption, each with the image's 5 ``reference_strs``) and
    ``train_images/<hex id>.jpg``."""
    names = list(COLOURS)
    files = {"images": str(root / "train_images")}
    for split, count, first in (("train", n_train, 0), ("val", n_eval, 100)):
        entries = []
        for i in range(count):
            image_id = f"{first + i:04x}abcdef0123ab"
            colour = names[i % len(names)]
            _jpg(root / "train_images" / f"{image_id}.jpg", colour)
            refs = [f"a {colour} sign says stop", f"the {colour} sign says stop", f"a {colour} sign reads stop",
                    f"a {colour} board says stop", f"a {colour} sign says halt"]
            for k, ref in enumerate(refs):
                entries.append({"image_id": image_id, "image_classes": ["Sign"], "flickr_original_url": "",
                                "flickr_300k_url": "", "image_width": 32, "image_height": 32, "set_name": split,
                                "image_name": image_id, "image_path": f"train/{image_id}.jpg", "caption_id": k,
                                "caption_str": ref, "caption_tokens": ["<s>", *ref.split(), "</s>"],
                                "reference_strs": refs, "reference_tokens": [r.split() for r in refs]})
        path = root / f"TextCaps_0.1_{split}.json"
        path.write_text(json.dumps({"dataset_type": split, "dataset_name": "textcaps", "dataset_version": "0.1",
                                    "data": entries}))
        files[split] = str(path)
    return files


# --- VizWiz-VQA accuracy --------------------------------------------------------------------------------------------

METRIC_ANNOTATIONS = [
    # c = 6 after the prediction "The Coke!" -> "coke" (article and punctuation dropped): full credit
    _vizwiz_vqa_record("VizWiz_val_00000000.jpg", "What drink?", _answers(("coca cola", 4), ("coke", 6)), "other", 1),
    # unanswerable question: 8 of 10 said "unanswerable"
    _vizwiz_vqa_record("VizWiz_val_00000001.jpg", "What is it?", _answers(("unanswerable", 8), ("blue", 2)),
                       "unanswerable", 0),
    # c = 2: 2 annotators see 1 match (1/3), 8 see 2 (2/3): (2/3 + 16/3) / 10 = 0.6
    _vizwiz_vqa_record("VizWiz_val_00000002.jpg", "Colour?", _answers(("red", 2), ("dark red", 8)), "other", 1),
    # the prediction "two" becomes "2", the GT answers stay raw: no match (VQAv2 would give 1.0)
    _vizwiz_vqa_record("VizWiz_val_00000003.jpg", "How many?", _answers(("two", 10)), "number", 1),
]
METRIC_PREDICTIONS = {"VizWiz_val_00000000.jpg": "The Coke!", "VizWiz_val_00000001.jpg": "unanswerable",
                      "VizWiz_val_00000002.jpg": " Red\n", "VizWiz_val_00000003.jpg": "two"}


def test_vizwiz_accuracy_hand_computed():
    score = vizwiz_accuracy(METRIC_PREDICTIONS, METRIC_ANNOTATIONS)
    assert score.per_question == pytest.approx({"VizWiz_val_00000000.jpg": 1.0, "VizWiz_val_00000001.jpg": 1.0,
                                                "VizWiz_val_00000002.jpg": 0.6, "VizWiz_val_00000003.jpg": 0.0})
    assert score.overall == 65.0  # (1 + 1 + 0.6 + 0) / 4
    assert score.per_answer_type == {"other": 80.0, "unanswerable": 100.0, "number": 0.0}
    # results-file form [{"image", "answer"}] gives the same
    records = [{"image": k, "answer": v} for k, v in METRIC_PREDICTIONS.items()]
    assert vizwiz_accuracy(records, METRIC_ANNOTATIONS).overall == 65.0
    # where VQAv2's evaluation differs: all-identical GT answers are not normalised there, and both sides match
    assert vqa_soft_score("two", ["two"] * 10) == 1.0 and vizwiz_soft_score("two", ["two"] * 10) == 0.0
    # an unanswerable question answered with a real answer: 2 of 10 said "blue" -> 0.6
    assert vizwiz_soft_score("blue", [a["answer"] for a in METRIC_ANNOTATIONS[1]["answers"]]) == pytest.approx(0.6)


def test_vizwiz_normalisation_and_contractions():
    assert normalize_vizwiz_prediction("  The Coke!\t") == "coke"
    assert normalize_vizwiz_prediction("Three cans.") == "3 cans"
    # VizWiz's contractions table uses the typographic apostrophe where VQAv2's uses "'"
    assert normalize_vizwiz_prediction("dont know") == "don\u2019t know"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_vizwiz_prediction("cant") == "can't"  # one of the entries that keep "'"


def test_vizwiz_accuracy_rejects_mismatched_images():
    with pytest.raises(ValueError, match="annotated but not predicted"):
        vizwiz_accuracy({}, METRIC_ANNOTATIONS[:1])
    with pytest.raises(ValueError, match="not annotated"):
        vizwiz_accuracy({**METRIC_PREDICTIONS, "x.jpg": "a"}, METRIC_ANNOTATIONS)


# --- VizWiz-VQA loader ----------------------------------------------------------------------------------------------

def test_vizwiz_vqa_loader_and_binding_score(tmp_path):
    files = write_vizwiz_vqa(tmp_path, n_train=4, n_eval=2)
    train = VizWizVQADataset.from_vizwiz(files["train"], files["images"], image_check="decode")
    assert len(train) == 4 and train.question_ids()[0] == "VizWiz_train_00000000.jpg"
    record = train.records[3]
    assert record.answer_type == "unanswerable" and record.answer_scores == pytest.approx(
        {"unanswerable": 1.0, "yellow": 0.3})
    assert train.answerable == {f"VizWiz_train_{i:08d}.jpg": int(i != 3) for i in range(4)}
    item = train[0]
    assert item["image"].size == (32, 32) and item["question_id"] == "VizWiz_train_00000000.jpg"
    # images are found by file name: the val image 0 is not the train image 0
    val = VizWizVQADataset.from_vizwiz(files["val"], files["images"])
    assert val.records[0].image_path.parent.name == "val"
    test = VizWizVQADataset.from_vizwiz(files["test"], files["images"])
    assert len(test) == 2 and test.records[0].answers == () and test.answerable[test.question_ids()[0]] is None
    # the training binding's scorer uses the VizWiz evaluation for VizWiz data
    predictions = [{"question_id": "VizWiz_val_00000000.jpg", "answer": "Red."},
                   {"question_id": "VizWiz_val_00000001.jpg", "answer": "two"}]
    scores = _vqa_score(predictions, val)
    assert scores["vizwiz_accuracy"] == scores["vqa_accuracy"] == 50.0
    assert scores["vizwiz_accuracy_other"] == 50.0


def _bad_vizwiz_vqa(tmp_path: Path) -> dict[str, str]:
    files = write_vizwiz_vqa(tmp_path, n_train=4, n_eval=2)
    records = json.loads(Path(files["train"]).read_text())
    records[1]["answer_type"] = "maybe"
    records[2]["answers"][4] = {"answer": 7, "answer_confidence": "yes"}
    records.append(_vizwiz_vqa_record("VizWiz_train_00000009.jpg", "what?", _answers(("red", 10)), "other", 1))
    # no such val image; the train image 0 must not stand in for it
    records.append(_vizwiz_vqa_record("VizWiz_val_00000000.png", "what?", _answers(("red", 10)), "other", 1))
    Path(files["train"]).write_text(json.dumps(records))
    return files


def test_vizwiz_vqa_bad_records_raise_and_skip(tmp_path):
    files = _bad_vizwiz_vqa(tmp_path)
    with pytest.raises(BadInputError, match=r"VizWiz-VQA file .*train\.json', record #1 \(VizWiz_train_00000001"
                                            r"\.jpg\): answer_type 'maybe'") as err:
        VizWizVQADataset.from_vizwiz(files["train"], files["images"])
    assert err.value.reason == "malformed_record"
    policy = BadInputPolicy("skip")
    dataset = VizWizVQADataset.from_vizwiz(files["train"], files["images"], policy=policy)
    assert dataset.question_ids() == ["VizWiz_train_00000000.jpg", "VizWiz_train_00000003.jpg"]
    assert policy.counts == {"malformed_record": 2, "missing_image": 2}
    assert any("record #2 (VizWiz_train_00000002.jpg): answers[4]" in m for m in policy.examples["malformed_record"])
    assert any("VizWiz_val_00000000.png" in m for m in policy.examples["missing_image"])


# --- captions -------------------------------------------------------------------------------------------------------

def test_vizwiz_captions_drop_rejected_and_precanned(tmp_path):
    files = write_vizwiz_captions(tmp_path, n_train=4, n_eval=2)
    train = load_vizwiz_captions(files["train"], files["images"], image_check="decode")
    assert len(train) == 4 * 3  # pairs: 3 kept captions per image
    val = load_vizwiz_captions(files["val"], files["images"], view="images")
    refs = val.references()
    assert sorted(refs) == [4, 5] and refs[4] == ["a red square on a white card"] * 3
    assert val.images[0].image_path.parent.name == "val"
    # one image, prediction "a red square": precision 1, brevity penalty exp(1 - 7/3) as every kept reference has 7
    # words (had the rejected 3-word caption been kept, the closest reference length would be 3 and Bleu_1 = 1)
    scores = _caption_score([{"image_id": 4, "caption": "a red square"}], val, use_java=False)
    assert scores["Bleu_1"] == pytest.approx(math.exp(1 - 7 / 3), rel=1e-6)


def test_textcaps_references_and_score(tmp_path):
    files = write_textcaps(tmp_path, n_train=4, n_eval=2)
    train = load_textcaps(files["train"], files["images"], image_check="decode")
    assert len(train) == 4 * 5 and train.images[0].image_id == "0000abcdef0123ab"
    assert train[0]["caption"] == "a red sign says stop"
    val = load_textcaps(files["val"], files["images"], view="images")
    refs = val.references()
    assert list(refs) == ["0064abcdef0123ab", "0065abcdef0123ab"] and len(refs["0064abcdef0123ab"]) == 5
    # "a red sign": 3 words against 5-word references: Bleu_1 = exp(1 - 5/3)
    scores = _caption_score([{"image_id": "0064abcdef0123ab", "caption": "a red sign"}], val, use_java=False)
    assert scores["Bleu_1"] == pytest.approx(math.exp(1 - 5 / 3), rel=1e-6)


def test_caption_bad_records_raise_and_skip(tmp_path):
    vw = write_vizwiz_captions(tmp_path / "vizwiz", n_train=2, n_eval=1)
    data = json.loads(Path(vw["train"]).read_text())
    data["annotations"][0]["is_rejected"] = "no"
    data["images"].append({"file_name": "VizWiz_train_00000042.jpg", "vizwiz_url": "", "id": 42,
                           "text_detected": False})
    data["annotations"].append({"image_id": 42, "id": 999, "caption": "a cat", "is_precanned": False,
                                "is_rejected": False, "text_detected": False})
    Path(vw["train"]).write_text(json.dumps(data))
    with pytest.raises(BadInputError, match=r"VizWiz-Captions file .*train\.json', annotations\[0\]: field "
                                            r"'is_rejected' is 'no'"):
        load_vizwiz_captions(vw["train"], vw["images"])
    policy = BadInputPolicy("skip")
    dataset = load_vizwiz_captions(vw["train"], vw["images"], policy=policy, view="images")
    assert len(dataset) == 2 and policy.counts == {"malformed_record": 1, "missing_image": 1}
    assert "image 42 (VizWiz_train_00000042.jpg)" in policy.examples["missing_image"][0]

    tc = write_textcaps(tmp_path / "textcaps", n_train=2, n_eval=1)
    data = json.loads(Path(tc["train"]).read_text())
    del data["data"][0]["image_path"], data["data"][0]["image_name"]
    data["data"][6]["reference_strs"] = ["ok", 3]
    Path(tc["train"]).write_text(json.dumps(data))
    with pytest.raises(BadInputError, match=r"TextCaps file .*TextCaps_0\.1_train\.json', data\[0\] \(image_id "
                                            r"'0000abcdef0123ab'\): needs 'image_path' or 'image_name'"):
        load_textcaps(tc["train"], tc["images"])
    policy = BadInputPolicy("skip")
    dataset = load_textcaps(tc["train"], tc["images"], policy=policy, view="images")
    assert len(dataset) == 2 and policy.counts == {"malformed_record": 2}
    assert "data[6] (image_id '0001abcdef0123ab')" in policy.examples["malformed_record"][1]


# --- 2-step training runs -------------------------------------------------------------------------------------------

def _tiny_run(tmp_path: Path, task: dict[str, Any], tiny: str = "blip_caption") -> Any:
    config = {
        "model": {"tiny": tiny},
        "method": {"type": "lora", "r": 4, "lora_alpha": 8},
        "task": {"max_length": 16, **task},
        "optim": {"learning_rate": 1e-3, "max_steps": 2, "batch_size": 2, "eval_batch_size": 4},
        "eval": {"strategy": "no", "max_new_tokens": 3, "num_beams": 1, "java": "no"},
        "run": {"output_dir": str(tmp_path / "run"), "seed": 7, "logging_steps": 1, "progress_bar": False,
                "report_to": ["csv"]},
    }
    return run_training(load_config(write_config(tmp_path / "config.yaml", config)))


@pytest.mark.parametrize("tiny", ["blip_caption", "qwen2_vl"])
def test_run_training_vizwiz_vqa(tmp_path, tiny):
    files = write_vizwiz_vqa(tmp_path / "data", n_train=4, n_eval=2)
    task = {"type": "vqa", "train": files["train"], "eval": files["val"], "test": files["test"],
            "images": files["images"]}
    if tiny == "qwen2_vl":  # the chat twin: prompt through its chat template, room for the image tokens
        task["max_length"] = 256
    else:
        task["prompt"] = "{question}"
    result = _tiny_run(tmp_path, task, tiny)
    assert result.global_step == 2 and result.metric == "vqa_accuracy"
    assert {"vqa_accuracy", "vizwiz_accuracy", "vizwiz_accuracy_other"} <= set(result.metrics["eval"])
    assert "vizwiz_accuracy" not in result.metrics["test"]  # the test split has no answers: predicted, not scored
    predictions = json.loads((tmp_path / "run" / "predictions_test.json").read_text())
    assert [p["question_id"] for p in predictions] == ["VizWiz_test_00000000.jpg", "VizWiz_test_00000001.jpg"]


@pytest.mark.parametrize("layout", ["vizwiz_captions", "textcaps"])
def test_run_training_captions(tmp_path, layout):
    writer = write_vizwiz_captions if layout == "vizwiz_captions" else write_textcaps
    files = writer(tmp_path / "data", n_train=4, n_eval=2)
    result = _tiny_run(tmp_path, {"type": "caption", "train": files["train"], "eval": files["val"],
                                  "test": files["val"], "images": files["images"], "prompt": "a picture of"})
    assert result.global_step == 2 and result.metric == "CIDEr"
    assert "CIDEr" in result.metrics["eval"] and "Bleu_4" in result.metrics["test"]
    predictions = json.loads((tmp_path / "run" / "predictions_test.json").read_text())
    assert len(predictions) == 2


def test_vqa_format_detection_keeps_karpathy_files(tmp_path):
    files = write_vizwiz_vqa(tmp_path, n_train=2, n_eval=1)
    assert isinstance(_load_vqa(Path(files["val"]), None, Path(files["images"]), BadInputPolicy()), VizWizVQADataset)
    karpathy = tmp_path / "karpathy_val.json"
    karpathy.write_text(json.dumps([{"img_id": "VizWiz_val_00000000", "sent": "what colour is this?",
                                     "question_id": 5, "label": {"red": 1.0}}]))
    dataset = _load_vqa(karpathy, None, Path(files["images"]), BadInputPolicy())
    assert type(dataset) is VQADataset and dataset.question_ids() == [5]


def test_train_check_deep_on_vizwiz_vqa(tmp_path, capsys):
    files = write_vizwiz_vqa(tmp_path / "data", n_train=4, n_eval=2)
    config = tmp_path / "config.yaml"
    write_config(config, {"model": {"tiny": "blip_caption"}, "method": {"type": "lora", "r": 4},
                          "task": {"type": "vqa", "train": files["train"], "eval": files["val"],
                                   "images": files["images"]},
                          "run": {"output_dir": str(tmp_path / "run")}})
    assert main(["train", str(config), "--check", "--deep"]) == 0
    out = capsys.readouterr().out
    assert "data OK: train 4 records, eval 2 records (every image decoded)" in out
    assert "answer list (5 answers, built from the training answers)" in out  # 4 colours + "unanswerable"
    (Path(files["images"]) / "val" / "VizWiz_val_00000001.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert main(["train", str(config), "--check", "--deep"]) == 2
    assert "VizWiz_val_00000001.jpg" in capsys.readouterr().err
    assert main(["train", str(config), "--check", "--deep", "--set", "task.bad_input=skip"]) == 0
    out = capsys.readouterr().out
    assert "eval 1 records" in out and "corrupt_image" in out
