"""Loaders for VQAv2 (official + Karpathy), SNLI-VE, COCO captions; answer vocab; bad-input handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlpeft.tasks import (
    AnswerVocab,
    BadInputError,
    BadInputPolicy,
    CaptionDataset,
    ImageFolderIndex,
    SNLIVEDataset,
    VQADataset,
    numeric_image_id,
    vqa_soft_scores,
)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0)]


def _jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    """COCO-style folder: images 9 and 25 in train2014, 42 (a restval image) in val2014."""
    root = tmp_path / "images"
    _jpeg(root / "train2014" / "COCO_train2014_000000000009.jpg", COLOURS[0])
    _jpeg(root / "train2014" / "COCO_train2014_000000000025.jpg", COLOURS[1])
    _jpeg(root / "val2014" / "COCO_val2014_000000000042.jpg", COLOURS[2])
    return root


def _answers(*pairs: tuple[str, int]) -> list[dict]:
    out = []
    for answer, count in pairs:
        out += [{"answer": answer, "answer_confidence": "yes", "answer_id": len(out) + 1 + i} for i in range(count)]
    return out


def _official(tmp_path: Path, questions: list, annotations: list) -> tuple[Path, Path]:
    q = _write(tmp_path / "questions.json", {"task_type": "Open-Ended", "questions": questions})
    a = _write(tmp_path / "annotations.json", {"annotations": annotations})
    return q, a


QUESTIONS = [
    {"image_id": 9, "question": "What color is the box?", "question_id": 90},
    {"image_id": 42, "question": "How many cats?", "question_id": 420},
]
ANNOTATIONS = [
    {"question_id": 90, "image_id": 9, "question_type": "what color is the", "answer_type": "other",
     "multiple_choice_answer": "red", "answers": _answers(("red", 7), ("Blue", 2), ("green", 1))},
    {"question_id": 420, "image_id": 42, "question_type": "how many", "answer_type": "number",
     "multiple_choice_answer": "2", "answers": _answers(("2", 10))},
]


# ------------------------------------------------------------------------------------------------ soft scores
def test_soft_scores_are_the_official_leave_one_out_average():
    for count, expected in [(1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["yes"] * count + [f"other{i}" for i in range(10 - count)]
        assert vqa_soft_scores(answers)["yes"] == pytest.approx(expected)
    # n = 3 by hand: a (c=2): (2 * min(1, 1/3) + 1 * min(1, 2/3)) / 3 = 4/9; b (c=1): (0 + 2 * 1/3) / 3 = 2/9
    scores = vqa_soft_scores(["a", "a", "b"])
    assert scores["a"] == pytest.approx(4 / 9) and scores["b"] == pytest.approx(2 / 9)
    with pytest.raises(ValueError):
        vqa_soft_scores([])


# ------------------------------------------------------------------------------------------------ images
def test_image_index_resolves_coco_ids_across_folders(coco: Path):
    index = ImageFolderIndex(coco)
    assert index.find(42).parent.name == "val2014"
    assert index.find("COCO_train2014_000000000042") == index.find(42)  # the id, not the split in the name
    assert index.find(9).name == "COCO_train2014_000000000009.jpg"
    assert index.find(7) is None
    assert numeric_image_id("COCO_val2014_000000393225.jpg") == 393225
    with pytest.raises(ValueError, match="digits"):
        numeric_image_id("cat")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderIndex(coco / "nowhere")


# ------------------------------------------------------------------------------------------------ VQA
def test_vqa_official_records_and_lazy_images(tmp_path: Path, coco: Path):
    q, a = _official(tmp_path, QUESTIONS, ANNOTATIONS)
    ds = VQADataset.from_official(q, a, coco)
    assert len(ds) == 2
    r = ds.records[0]
    assert (r.question_id, r.image_id, r.answer_type, r.question_type) == (90, 9, "other", "what color is the")
    assert len(r.answers) == 10 and r.answers.count("Blue") == 2
    assert r.answer_scores == pytest.approx({"red": 1.0, "blue": 0.6, "green": 0.3})
    item = ds[1]
    assert item["image"].size == (24, 16) and item["image"].mode == "RGB"
    assert item["image"].getpixel((5, 5))[2] > 200  # image 42 is blue: the val2014 file was found
    assert item["answers"] == ["2"] * 10 and item["multiple_choice_answer"] == "2"


def test_vqa_official_without_annotations_has_no_answers(tmp_path: Path, coco: Path):
    q, _ = _official(tmp_path, QUESTIONS, ANNOTATIONS)
    ds = VQADataset.from_official(q, None, coco)
    assert [r.answers for r in ds.records] == [(), ()]
    assert ds[0]["answer_scores"] == {}


def test_vqa_karpathy_with_and_without_official_annotations(tmp_path: Path, coco: Path):
    karpathy = _write(tmp_path / "karpathy_train.json", [
        {"img_id": "COCO_val2014_000000000042", "sent": "How many cats?", "question_id": 420,
         "label": {"2": 1.0}, "answer_type": "number", "question_type": "how many"},
        {"img_id": "COCO_train2014_000000000009", "sent": "What color is the box?", "question_id": 90,
         "label": {"red": 1.0, "blue": 0.6}},
    ])
    ds = VQADataset.from_karpathy(karpathy, coco)
    assert [r.image_id for r in ds.records] == [42, 9]
    assert ds.records[1].answer_scores == {"red": 1.0, "blue": 0.6} and ds.records[1].answers == ()
    _, a = _official(tmp_path, QUESTIONS, ANNOTATIONS)
    joined = VQADataset.from_karpathy(karpathy, coco, annotations_json=[a])
    assert len(joined.records[1].answers) == 10 and joined.records[1].question_type == "what color is the"
    assert joined.records[0].answer_type == "number"


# ------------------------------------------------------------------------------------------------ vocab
def test_answer_vocab_build_save_load_and_soft_targets(tmp_path: Path, coco: Path):
    q, a = _official(tmp_path, QUESTIONS, ANNOTATIONS)
    ds = VQADataset.from_official(q, a, coco)
    vocab = AnswerVocab.build(ds.records, top_k=3)
    # every answer occurs in one question: ties broken alphabetically
    assert vocab.label2ans == ["2", "blue", "green"]
    assert AnswerVocab.build(ds.records, top_k=3129).label2ans == ["2", "blue", "green", "red"]
    path = tmp_path / "trainval_ans2label.json"
    vocab.save(path)
    assert json.loads(path.read_text()) == {"2": 0, "blue": 1, "green": 2}
    assert AnswerVocab.load(path) == vocab
    vocab.save_label2ans(tmp_path / "label2ans.json")
    assert AnswerVocab.load(tmp_path / "label2ans.json") == vocab
    target = vocab.soft_target(ds.records[0].answer_scores)
    assert target.tolist() == pytest.approx([0.0, 0.6, 0.3])  # "red" is outside the top-3
    assert vocab.soft_targets([{}, {"2": 1.0}]).shape == (2, 3)
    _write(tmp_path / "bad.json", {"a": 0, "b": 2})
    with pytest.raises(ValueError, match="0..1"):
        AnswerVocab.load(tmp_path / "bad.json")


def test_answer_not_in_vocab_raises_or_is_skipped_and_counted(tmp_path: Path, coco: Path):
    q, a = _official(tmp_path, QUESTIONS, ANNOTATIONS)
    vocab = AnswerVocab(["red", "blue"])
    with pytest.raises(BadInputError, match=r"question_id 420.*not in|none of the answers") as err:
        VQADataset.from_official(q, a, coco, answer_vocab=vocab)
    assert err.value.reason == "answer_not_in_vocab" and "questions.json" in str(err.value)
    policy = BadInputPolicy("skip")
    ds = VQADataset.from_official(q, a, coco, answer_vocab=vocab, policy=policy)
    assert [r.question_id for r in ds.records] == [90]
    assert policy.counts == {"answer_not_in_vocab": 1}
    assert ds.out_of_vocab_answer_entries == 1  # "green" of question 90


# ------------------------------------------------------------------------------------------------ SNLI-VE
def _snli(tmp_path: Path, lines: list) -> Path:
    root = tmp_path / "flickr30k-images"
    _jpeg(root / "1000092795.jpg", COLOURS[0])
    _jpeg(root / "3416050480.jpg", COLOURS[1])
    path = tmp_path / "snli_ve_train.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def _pair(image: str, label: str | None, hyp: str = "Two men are outside.") -> dict:
    rec = {"Flickr30K_ID": image, "sentence1": "Two young guys are outside.", "sentence2": hyp,
           "pairID": f"{image}.jpg#0r1{(label or 'x')[0]}"}
    if label is not None:
        rec["gold_label"] = label
    return rec


def test_snli_ve_loader(tmp_path: Path):
    path = _snli(tmp_path, [_pair("1000092795", "entailment"), _pair("3416050480", "contradiction", "A cat."), ""])
    ds = SNLIVEDataset.from_jsonl(path, tmp_path / "flickr30k-images")
    assert [(r.image_id, r.label, r.label_id) for r in ds.records] == [("1000092795", "entailment", 0),
                                                                       ("3416050480", "contradiction", 2)]
    item = ds[1]
    assert item["hypothesis"] == "A cat." and item["premise"].startswith("Two young")
    assert item["image"].getpixel((3, 3))[1] > 200


def test_snli_ve_dash_and_missing_gold_label(tmp_path: Path):
    path = _snli(tmp_path, [_pair("1000092795", "-"), _pair("1000092795", None), _pair("3416050480", "neutral")])
    with pytest.raises(BadInputError, match=r"line 1 .*gold_label '-'") as err:
        SNLIVEDataset.from_jsonl(path, tmp_path / "flickr30k-images")
    assert err.value.reason == "unknown_label" and "snli_ve_train.jsonl" in str(err.value)
    policy = BadInputPolicy("skip")
    ds = SNLIVEDataset.from_jsonl(path, tmp_path / "flickr30k-images", policy=policy)
    assert len(ds) == 1 and policy.counts == {"unknown_label": 1, "malformed_record": 1}
    assert "line 2" in policy.report() and "gold_label" in policy.report()


# ------------------------------------------------------------------------------------------------ captions
def _karpathy_captions(tmp_path: Path) -> Path:
    def image(cocoid: int, folder: str, split: str, captions: list[str]) -> dict:
        return {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "cocoid": cocoid, "imgid": cocoid,
                "split": split, "sentids": list(range(len(captions))),
                "sentences": [{"raw": c + " ", "tokens": c.lower().split(), "sentid": cocoid * 10 + k, "imgid": 0}
                              for k, c in enumerate(captions)]}

    return _write(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": [
        image(9, "train2014", "train", ["A red box.", "Red square on white."]),
        image(42, "val2014", "restval", ["A blue thing."]),
        image(25, "train2014", "test", ["A green box.", "Green.", "Something green."]),
    ]})


def test_captions_karpathy_splits_views_and_references(tmp_path: Path, coco: Path):
    path = _karpathy_captions(tmp_path)
    train = CaptionDataset.from_karpathy(path, coco, "train")
    assert [im.image_id for im in train.images] == [9, 42]  # restval joins train
    assert len(train) == 3 and train[2]["caption"] == "A blue thing." and train[2]["image_id"] == 42
    assert train[0]["references"] == ["A red box.", "Red square on white."]
    assert [im.image_id for im in CaptionDataset.from_karpathy(path, coco, "train", include_restval=False).images] == [9]
    test = CaptionDataset.from_karpathy(path, coco, "test", view="images")
    assert len(test) == 1 and "caption" not in test[0]
    assert test.references() == {25: ["A green box.", "Green.", "Something green."]}
    assert len(test.with_view("pairs")) == 3
    with pytest.raises(ValueError, match="split"):
        CaptionDataset.from_karpathy(path, coco, "dev")


def test_captions_coco_format(tmp_path: Path, coco: Path):
    path = _write(tmp_path / "captions_val.json", {
        "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}, {"id": 9, "file_name": "x.jpg"}],
        "annotations": [{"image_id": 42, "id": 1, "caption": "A blue thing."},
                        {"image_id": 9, "id": 2, "caption": "A red box."},
                        {"image_id": 42, "id": 3, "caption": " Blue. "}]})
    ds = CaptionDataset.from_coco(path, coco, view="images")
    assert ds.references() == {42: ["A blue thing.", "Blue."], 9: ["A red box."]}
    assert ds[0]["image"].getpixel((2, 2))[2] > 200


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_image_raises_naming_record_or_is_counted(tmp_path: Path, coco: Path):
    questions = [*QUESTIONS, {"image_id": 77, "question": "Where?", "question_id": 770}]
    annotations = [*ANNOTATIONS, {**ANNOTATIONS[1], "question_id": 770, "image_id": 77}]
    q, a = _official(tmp_path, questions, annotations)
    with pytest.raises(BadInputError, match=r"no image file for .*question_id 770") as err:
        VQADataset.from_official(q, a, coco)
    assert err.value.reason == "missing_image"
    policy = BadInputPolicy("skip")
    ds = VQADataset.from_official(q, a, coco, policy=policy)
    assert len(ds) == 2 and policy.counts == {"missing_image": 1} and policy.total == 1
    assert "missing_image: 1" in policy.report()


def test_corrupt_image_decode_check_and_lazy_error(tmp_path: Path, coco: Path):
    bad = coco / "val2014" / "COCO_val2014_000000000042.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    q, a = _official(tmp_path, QUESTIONS, ANNOTATIONS)
    lazy = VQADataset.from_official(q, a, coco)  # "exists" check only
    with pytest.raises(BadInputError, match=r"corrupt image file .*COCO_val2014_000000000042\.jpg.*question_id 420"):
        lazy[1]
    with pytest.raises(BadInputError, match="corrupt image file") as err:
        VQADataset.from_official(q, a, coco, image_check="decode")
    assert err.value.reason == "corrupt_image"
    policy = BadInputPolicy("skip")
    ds = VQADataset.from_official(q, a, coco, image_check="decode", policy=policy)
    assert [r.question_id for r in ds.records] == [90] and policy.counts == {"corrupt_image": 1}
    with pytest.raises(ValueError, match="image_check"):
        VQADataset.from_official(q, a, coco, image_check="maybe")


def test_malformed_records(tmp_path: Path, coco: Path):
    questions = [QUESTIONS[0], {"image_id": 9, "question_id": 91}, {"image_id": 9, "question": "Why?", "question_id": 92}]
    q, a = _official(tmp_path, questions, ANNOTATIONS)
    with pytest.raises(BadInputError, match=r"question_id 91: missing field 'question'"):
        VQADataset.from_official(q, a, coco)
    policy = BadInputPolicy("skip")
    ds = VQADataset.from_official(q, a, coco, policy=policy)
    # 91 lacks 'question'; 92 has no annotation; annotation 420 has no question
    assert len(ds) == 1 and policy.counts == {"malformed_record": 3}
    report = policy.report()
    assert "skipped 3 item(s)" in report and "question_id 420 has no question" in report
    # a JSONL line that is not JSON
    path = _snli(tmp_path, ["{not json", _pair("1000092795", "neutral")])
    with pytest.raises(BadInputError, match=r"snli_ve_train\.jsonl' line 1: not valid JSON"):
        SNLIVEDataset.from_jsonl(path, tmp_path / "flickr30k-images")
    # Karpathy label with an invalid score
    karpathy = _write(tmp_path / "k.json", [{"img_id": "COCO_train2014_000000000009", "sent": "Q?",
                                             "question_id": 5, "label": {"red": 3}}])
    with pytest.raises(BadInputError, match=r"k\.json', question_id 5: label score for 'red' is 3"):
        VQADataset.from_karpathy(karpathy, coco)
    # a caption image without sentences
    bad_captions = _write(tmp_path / "dc.json", {"images": [{"filename": "a.jpg", "cocoid": 9, "split": "val",
                                                             "sentences": []}]})
    with pytest.raises(BadInputError, match=r"image 9 \(a\.jpg\): no sentences"):
        CaptionDataset.from_karpathy(bad_captions, coco, "val")
    # a whole file that is not JSON always raises
    (tmp_path / "broken.json").write_text("[", encoding="utf-8")
    with pytest.raises(BadInputError, match="broken.json.*not valid JSON"):
        VQADataset.from_karpathy(tmp_path / "broken.json", coco)


def test_empty_split_raises_or_is_counted(tmp_path: Path, coco: Path):
    path = _karpathy_captions(tmp_path)
    with pytest.raises(BadInputError, match=r"dataset_coco\.json.*\['val'\] holds no images") as err:
        CaptionDataset.from_karpathy(path, coco, "val")
    assert err.value.reason == "empty_split"
    policy = BadInputPolicy("skip")
    ds = CaptionDataset.from_karpathy(path, coco, "val", policy=policy)
    assert len(ds) == 0 and policy.counts == {"empty_split": 1}
    empty_q = _write(tmp_path / "q_empty.json", {"questions": []})
    with pytest.raises(BadInputError, match=r"q_empty\.json.*empty split"):
        VQADataset.from_official(empty_q, None, coco)
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("\n", encoding="utf-8")
    with pytest.raises(BadInputError, match=r"empty\.jsonl.*empty split"):
        SNLIVEDataset.from_jsonl(empty_jsonl, coco)
    # every record skipped -> the split is empty, and that is counted too
    policy = BadInputPolicy("skip")
    snli = _snli(tmp_path, [_pair("1000092795", "-")])
    assert len(SNLIVEDataset.from_jsonl(snli, tmp_path / "flickr30k-images", policy=policy)) == 0
    assert policy.counts == {"unknown_label": 1, "empty_split": 1}


def test_policy_validation():
    with pytest.raises(ValueError, match="on_error"):
        BadInputPolicy("ignore")
    policy = BadInputPolicy("skip")
    with pytest.raises(ValueError, match="unknown bad-input reason"):
        policy.handle("whatever", "x")
    assert policy.report() == "bad input: nothing skipped"
