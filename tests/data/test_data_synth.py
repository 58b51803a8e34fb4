"""The built-in synthetic benchmark: determinism, standard formats through the task loaders, held-out pairs,
answers that need the image, and the ``data synth`` command."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from vlpeft.data import PRESETS, SynthConfig, benchmark_files, ensure_benchmark, generate_benchmark, load_meta
from vlpeft.data.language import make_captions, make_hypotheses, make_questions, refer, vocabulary
from vlpeft.data.scenes import all_combinations, heldout_combinations, sample_scene, scene_rng
from vlpeft.data.synth import add_parser
from vlpeft.tasks import BadInputPolicy, CaptionDataset, SNLIVEDataset, VQADataset

TINY = dataclasses.replace(PRESETS["tiny"], images=(40, 8, 24), ve_images=(30, 6, 24))


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth")
    meta = generate_benchmark(root, TINY, progress=False)
    return root, meta


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "synth_meta.json"):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic_and_seed_dependent(bench, tmp_path):
    root, _ = bench
    generate_benchmark(tmp_path / "again", TINY, progress=False)
    assert _digest(tmp_path / "again") == _digest(root)
    generate_benchmark(tmp_path / "other", dataclasses.replace(TINY, seed=1), progress=False)
    assert _digest(tmp_path / "other") != _digest(root)


def test_vqa_files_load_through_the_official_loader(bench):
    root, meta = bench
    files = benchmark_files(root)
    policy = BadInputPolicy(on_error="raise")
    for split, n_images in zip(("train", "val", "test"), TINY.images):
        dataset = VQADataset.from_official(files.vqa_questions(split), files.vqa_annotations(split),
                                           files.coco_images, policy=policy, image_check="decode")
        assert len(dataset) == meta["counts"][f"vqa_{split}_questions"] > n_images  # several questions per image
        item = dataset[0]
        assert len(item["answers"]) == 10
        assert item["image"].size == (TINY.image_size, TINY.image_size)
        assert item["answer_type"] in ("yes/no", "number", "other")
        assert item["multiple_choice_answer"] in item["answers"]
    raw = json.loads(files.vqa_questions("train").read_text())
    assert files.vqa_questions("train").name == "v2_OpenEnded_mscoco_train2014_questions.json"
    assert set(raw["questions"][0]) == {"image_id", "question", "question_id"}
    image_id = raw["questions"][0]["image_id"]
    assert (files.coco_images / "train2014" / f"COCO_train2014_{image_id:012d}.jpg").is_file()


def test_captions_load_through_the_karpathy_loader(bench):
    root, _ = bench
    files = benchmark_files(root)
    policy = BadInputPolicy(on_error="raise")
    train = CaptionDataset.from_karpathy(files.karpathy_json, files.coco_images, "train", policy=policy)
    test = CaptionDataset.from_karpathy(files.karpathy_json, files.coco_images, "test", view="images",
                                        policy=policy, image_check="decode")
    assert len(train) == TINY.images[0] * TINY.captions_per_image
    assert len(test) == TINY.images[2]
    references = test.references()
    assert all(len(refs) == TINY.captions_per_image for refs in references.values())
    assert all(len(set(refs)) == len(refs) for refs in references.values())  # five different captions
    record = json.loads(files.karpathy_json.read_text())["images"][0]
    assert set(record) >= {"filepath", "filename", "imgid", "split", "sentences", "cocoid"}
    assert record["sentences"][0]["tokens"] == record["sentences"][0]["raw"].lower().rstrip(".").replace(
        ",", "").replace(":", "").split()


def test_snli_ve_files_load_through_the_jsonl_loader(bench):
    root, meta = bench
    files = benchmark_files(root)
    policy = BadInputPolicy(on_error="raise")
    labels: Counter = Counter()
    for split in ("train", "val", "test"):
        dataset = SNLIVEDataset.from_jsonl(files.ve_jsonl[split], files.ve_images, policy=policy,
                                           image_check="decode")
        assert len(dataset) == meta["counts"][f"ve_{split}_pairs"]
        labels.update(r.label for r in dataset.records)
    assert files.ve_jsonl["val"].name == "snli_ve_dev.jsonl"
    assert set(labels) == {"entailment", "neutral", "contradiction"}
    assert min(labels.values()) > 0.2 * sum(labels.values())  # roughly balanced (1/3 each by design)


def test_heldout_pairs_appear_only_in_test(bench):
    root, meta = bench
    heldout = {tuple(c) for c in meta["heldout_combinations"]}
    assert len(heldout) == TINY.heldout_pairs
    assert len({c for c, _ in heldout}) == len({s for _, s in heldout}) == len(heldout)

    def mentions(text: str) -> bool:
        text = text.lower()
        return any(f"{c} {s}" in text or f"{s} of color {c}" in text for c, s in heldout)

    files = benchmark_files(root)
    for split in ("train", "val"):
        questions = json.loads(files.vqa_questions(split).read_text())["questions"]
        assert not any(mentions(q["question"]) for q in questions)
        ve = [json.loads(line) for line in files.ve_jsonl[split].read_text().splitlines()]
        assert not any(mentions(r["sentence2"]) or mentions(r["sentence1"]) for r in ve)
    captions = json.loads(files.karpathy_json.read_text())["images"]
    assert not any(mentions(s["raw"]) for im in captions if im["split"] != "test" for s in im["sentences"])
    test_captions = [s["raw"] for im in captions if im["split"] == "test" for s in im["sentences"]]
    assert any(mentions(c) for c in test_captions)
    assert meta["heldout_image_ids"]["coco_test"]


def test_scene_sampling_respects_allowed_pairs():
    heldout = heldout_combinations(4, seed=3)
    allowed = [c for c in all_combinations() if c not in heldout]
    for index in range(50):
        scene = sample_scene(scene_rng(3, "train", index), image_size=64, min_objects=1, max_objects=4,
                             allowed=allowed)
        assert not scene.combinations() & set(heldout)
        assert 1 <= len(scene.objects) <= 4
    with pytest.raises(ValueError, match="heldout combination count"):
        heldout_combinations(9, seed=0)
    with pytest.raises(ValueError, match="not among the allowed"):
        sample_scene(scene_rng(0, "test", 0), image_size=64, min_objects=1, max_objects=2,
                     allowed=allowed, required=heldout)


def test_questions_captions_and_hypotheses_are_true_of_the_scene():
    for index in range(40):
        rng = scene_rng(0, "test", index)
        scene = sample_scene(rng, image_size=64, min_objects=1, max_objects=4, allowed=all_combinations(),
                             occluder=index % 2 == 1)
        for question in make_questions(scene, rng, 4):
            if question.kind == "count" and question.text.startswith("How many") and " objects" not in question.text:
                noun = question.text.split()[2:-2]  # e.g. ["red", "circles"] or ["circles"]
                shape = noun[-1][:-1]
                colour = noun[0] if len(noun) == 2 else None
                expected = sum(o.shape == shape and (colour is None or o.colour == colour) for o in scene.objects)
                assert question.answer == str(expected), question
            if question.kind == "exist":
                colour, shape = question.text[len("Is there a "):-1].split()
                assert (question.answer == "yes") == ((colour, shape) in scene.combinations())
        for caption in make_captions(scene, rng, 5):
            for obj in scene.objects:
                assert f"{obj.colour} {obj.shape}" in caption.lower()
        for hypothesis in make_hypotheses(scene, rng, 3):
            if hypothesis.label == "neutral":
                assert scene.occluder is not None
            if hypothesis.label == "contradiction":
                assert scene.occluder is None
            if hypothesis.kind == "exist":
                colour, shape = hypothesis.text[len("There is a "):-1].split()
                assert ((colour, shape) in scene.combinations()) == (hypothesis.label == "entailment")


def test_refer_finds_unique_descriptions():
    scene = sample_scene(scene_rng(0, "train", 5), image_size=64, min_objects=4, max_objects=4,
                         allowed=[("red", "circle"), ("red", "square")])
    for obj in scene.objects:
        reference = refer(obj, scene)
        if reference is not None:
            words = reference.split()
            matches = [o for o in scene.objects if words[-1] in (o.shape, "object")
                       and all(w in (o.size, o.colour) for w in words[:-1])]
            assert matches == [obj]


def test_text_only_baselines_are_near_chance(bench):
    _, meta = bench
    baselines = meta["text_only_baselines"]
    # answers are drawn answer-first, so the text alone gives little: well below an image-conditioned model
    assert baselines["vqa"]["accuracy"] < 60
    assert baselines["snli_ve"]["accuracy"] < 50
    assert baselines["caption"]["CIDEr"] < 1.0
    words = set(vocabulary())
    files = benchmark_files(bench[0])
    questions = json.loads(files.vqa_questions("test").read_text())["questions"]
    for q in questions:
        assert set(q["question"].lower().rstrip("?").split()) <= words


def test_ensure_benchmark_reuses_complete_output(bench, tmp_path):
    root, meta = bench
    logs: list[str] = []
    assert ensure_benchmark(root, TINY, progress=False, log=logs.append) == meta
    assert logs and logs[0].startswith("using")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "coco").mkdir()
    small = dataclasses.replace(TINY, images=(4, 2, 2), ve_images=(4, 2, 2))
    made = ensure_benchmark(tmp_path / "partial", small, progress=False, log=logs.append)
    assert load_meta(tmp_path / "partial") == made
    assert made["counts"]["coco_train_images"] == 4


def test_config_validation():
    with pytest.raises(ValueError, match="images must be three image counts"):
        SynthConfig(images=(0, 1, 1))
    with pytest.raises(ValueError, match="questions_per_image"):
        SynthConfig(questions_per_image=0)
    with pytest.raises(ValueError, match="unknown SynthConfig fields"):
        SynthConfig.from_json({"seed": 0, "colours": 3})
    assert SynthConfig.from_json(TINY.to_json()) == TINY


def test_data_synth_command(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="vlpeft")
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "bench"
    args = parser.parse_args(["data", "synth", "--out", str(out), "--preset", "tiny", "--images", "6", "2", "4",
                              "--ve-images", "6", "2", "4", "--no-progress", "--seed", "5"])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "text-only baselines" in printed and "VQA accuracy" in printed
    meta = load_meta(out)
    assert meta["config"]["seed"] == 5 and meta["counts"]["coco_train_images"] == 6
