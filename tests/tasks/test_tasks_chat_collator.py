"""ChatCollator on every chat twin: labels cover exactly the assistant turns (text + end-of-turn token) for
multi-turn and multi-image conversations, by markers and by prefixes alike; the generation prompt is the training
rendering's prefix; truncation never cuts image placeholders; the loss is finite."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from vlpeft.tasks.bad_input import BadInputError, BadInputPolicy
from vlpeft.tasks.chat_collator import ChatCollator
from vlpeft.tasks.chat_data import load_chat_dataset
from vlpeft.tasks.chat_labels import spans_from_mask
from vlpeft.tasks.chat_records import single_turn_record
from vlpeft.testing.twins import TWINS, Twin, build_twin

NAMES = sorted(TWINS)


@functools.cache
def _twin(name: str) -> Twin:
    twin = build_twin(name)
    twin.model.eval()
    return twin


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _records(twin: Twin, folder: Path) -> list[dict[str, Any]]:
    """A two-turn conversation with a system turn and one image, a three-image single-turn record (images saved
    as PNG files), and a text-only one."""
    folder.mkdir(exist_ok=True)
    samples = twin.samples((1, 3))
    paths = []
    for k, image in enumerate([*samples[0].images, *samples[1].images]):
        paths.append(str(folder / f"{twin.spec.name}_{k}.png"))
        image.save(paths[-1])
    two_turn = {"id": "two_turn", "images": paths[:1], "messages": [
        {"role": "system", "content": [_text("answer in short")]},
        {"role": "user", "content": [{"type": "image"}, _text(samples[0].prompt)]},
        {"role": "assistant", "content": [_text(samples[0].answer)]},
        {"role": "user", "content": [_text("what colour is the shape ?")]},
        {"role": "assistant", "content": [_text("a red circle")]}]}
    multi_image = single_turn_record(paths[1:], samples[1].prompt, samples[1].answer, record_id="multi_image")
    text_only = single_turn_record([], "how many are there ?", "two", record_id="text_only")
    return [two_turn, multi_image, text_only]


def _answers(record: dict[str, Any]) -> list[str]:
    return [m["content"][0]["text"] for m in record["messages"] if m["role"] == "assistant"]


def _end_of_turn_id(collator: ChatCollator) -> int:
    """The token the template writes right after an assistant answer."""
    rendered = collator.render([{"role": "user", "content": [_text("what")]},
                                {"role": "assistant", "content": [_text("triangle")]}])
    tail = rendered.rsplit("triangle", 1)[1]
    return collator.tokenizer(tail, add_special_tokens=False)["input_ids"][0]


@pytest.mark.parametrize("name", NAMES)
def test_labels_are_exactly_the_assistant_turns(name: str, tmp_path: Path) -> None:
    twin = _twin(name)
    records = _records(twin, tmp_path)
    collator = ChatCollator(twin.processor)
    batch = collator(records)
    assert collator.label_method_used == "markers"
    end_id = _end_of_turn_id(collator)
    tokenizer = collator.tokenizer
    for row, record in enumerate(records):
        labelled = batch["labels"][row] != -100
        ids = batch["input_ids"][row]
        assert torch.equal(batch["labels"][row][labelled], ids[labelled])
        spans = spans_from_mask(labelled.long())
        answers = _answers(record)
        assert len(spans) == len(answers), (record["id"], spans)
        for (start, end), answer in zip(spans, answers):
            expected = [*tokenizer(answer, add_special_tokens=False)["input_ids"], end_id]
            assert ids[start:end].tolist() == expected, (record["id"], tokenizer.decode(ids[start:end]))
            assert tokenizer.decode(ids[start:end]) == tokenizer.decode(expected)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert batch["input_ids"].shape[0] == len(records)

    by_prefix = ChatCollator(twin.processor, label_method="prefix")(records)
    assert by_prefix.keys() == batch.keys()
    assert torch.equal(by_prefix["labels"], batch["labels"])
    assert torch.equal(by_prefix["input_ids"], batch["input_ids"])


@pytest.mark.parametrize("name", NAMES)
def test_single_turn_labels_match_the_twin_batch(name: str) -> None:
    twin = _twin(name)
    samples = twin.samples((1, 2))
    records = [single_turn_record(list(s.images), s.prompt, s.answer) for s in samples]
    ours, theirs = ChatCollator(twin.processor)(records), twin.batch(samples)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["labels"], theirs["labels"])


@pytest.mark.parametrize("name", NAMES)
def test_prompt_batch_is_the_training_prefix_and_the_loss_is_finite(name: str, tmp_path: Path) -> None:
    twin = _twin(name)
    records = _records(twin, tmp_path)
    collator = ChatCollator(twin.processor)
    batch = collator(records)
    prompts = collator.prompt_batch(records)
    assert prompts.ids == [r["id"] for r in records]
    assert prompts.targets == [_answers(r)[-1] for r in records] == collator.targets(records)
    mask = prompts.inputs["attention_mask"]
    assert (mask[:, -1] == 1).all()  # left padding
    for row in range(len(records)):
        last_answer = spans_from_mask((batch["labels"][row] != -100).long())[-1][0]
        prompt_ids = prompts.inputs["input_ids"][row][mask[row].bool()]
        assert prompt_ids.tolist() == batch["input_ids"][row][:last_answer].tolist(), records[row]["id"]

    with torch.no_grad():
        loss = twin.model(**batch).loss
        assert torch.isfinite(loss)
        generated = twin.model.generate(**prompts.inputs, max_new_tokens=2)
    assert generated.shape[0] == len(records)


@pytest.mark.parametrize("name", NAMES)
def test_truncation_keeps_image_placeholders_whole(name: str, tmp_path: Path) -> None:
    twin = _twin(name)
    record = _records(twin, tmp_path)[1]  # three images
    full = ChatCollator(twin.processor)([record])
    first_answer = int((full["labels"][0] != -100).nonzero()[0, 0])

    cut = ChatCollator(twin.processor, max_length=first_answer + 1)([record])
    assert cut["input_ids"].shape == (1, first_answer + 1)
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, : first_answer + 1])
    assert int((cut["labels"] != -100).sum()) == 1
    for key, value in cut.items():  # image inputs are kept whole
        if key.startswith("pixel") or key.startswith("image"):
            assert torch.equal(value, full[key]), key
    with torch.no_grad():
        assert torch.isfinite(twin.model(**cut).loss)

    with pytest.raises(BadInputError, match=r"'multi_image'.*exceed max_length=3.*image placeholders") as raised:
        ChatCollator(twin.processor, max_length=3)([record])
    assert raised.value.reason == "too_long"


def test_too_long_records_are_dropped_and_counted_under_skip(tmp_path: Path) -> None:
    twin = _twin("qwen2_vl")
    records = _records(twin, tmp_path)
    lengths = ChatCollator(twin.processor)(records)["attention_mask"].sum(dim=1).tolist()
    assert lengths[2] < 20 <= min(lengths[:2])  # the image records' placeholders run past 20 tokens
    policy = BadInputPolicy("skip")
    batch = ChatCollator(twin.processor, max_length=20, policy=policy)(records)
    assert batch["input_ids"].shape == (1, lengths[2])
    assert dict(policy.counts) == {"too_long": 2}
    with pytest.raises(BadInputError, match="all 1 record"):
        ChatCollator(twin.processor, max_length=3, policy=BadInputPolicy("skip"))(records[:1])


def test_bad_records_raise_or_are_skipped(tmp_path: Path) -> None:
    twin = _twin("idefics3")
    good, multi, _ = _records(twin, tmp_path)
    missing = {**multi, "id": "missing", "images": [*multi["images"][:2], str(tmp_path / "gone.png")]}
    miscounted = {**multi, "id": "miscounted", "images": multi["images"][:2]}
    with pytest.raises(BadInputError, match=r"gone\.png.*'missing'.*images\[2\]") as raised:
        ChatCollator(twin.processor)([good, missing])
    assert raised.value.reason == "missing_image"
    with pytest.raises(BadInputError, match=r"'miscounted'.*'images': 2 image\(s\) for 3 image part"):
        ChatCollator(twin.processor)([miscounted])
    question = {"id": "question", "images": [], "messages": [{"role": "user", "content": [_text("how many ?")]}]}
    with pytest.raises(BadInputError, match=r"'question'.*no assistant turn"):
        ChatCollator(twin.processor)([question])
    bot = {**question, "id": "bot", "messages": [{"role": "bot", "content": "hi"}]}
    with pytest.raises(BadInputError, match=r"'bot'.*'messages\[0\]\.role'.*unknown role 'bot'"):
        ChatCollator(twin.processor)([bot])
    policy = BadInputPolicy("skip")
    collator = ChatCollator(twin.processor, policy=policy)
    batch = collator([missing, good, miscounted, question, bot])
    assert torch.equal(batch["input_ids"], ChatCollator(twin.processor)([good])["input_ids"])
    assert dict(policy.counts) == {"missing_image": 1, "malformed_record": 3}
    prompts = collator.prompt_batch([missing, good, question])
    assert prompts.ids == ["two_turn", "question"] and prompts.targets == ["a red circle", None]
    assert prompts.inputs["input_ids"][1].tolist()[-3:] == collator.tokenizer(
        collator.render(question["messages"], add_generation_prompt=True), add_special_tokens=False
    )["input_ids"][-3:]


def test_template_without_markers_falls_back_to_prefixes(tmp_path: Path) -> None:
    twin = _twin("qwen2_5_vl")
    records = _records(twin, tmp_path)
    processor = TWINS["qwen2_5_vl"].build_processor()
    processor.chat_template = processor.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    collator = ChatCollator(processor)
    batch = collator(records)
    assert collator.label_method_used == "prefix"
    assert torch.equal(batch["labels"], ChatCollator(twin.processor)(records)["labels"])
    with pytest.raises(ValueError, match="no assistant token found"):
        ChatCollator(processor, label_method="markers")(records)
    with pytest.raises(ValueError, match="label_method"):
        ChatCollator(processor, label_method="guess")  # type: ignore[arg-type]


def test_dataset_rows_collate_like_records(tmp_path: Path) -> None:
    twin = _twin("gemma3")
    records = _records(twin, tmp_path)
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(records))
    table = load_chat_dataset(path, cache_dir=tmp_path / "cache")
    assert table[1]["messages"][0]["content"][0] == {"type": "image", "text": None}
    ours, expected = ChatCollator(twin.processor)([table[i] for i in range(len(table))]), \
        ChatCollator(twin.processor)(records)
    assert ours.keys() == expected.keys()
    for key in ours:
        assert torch.equal(ours[key], expected[key]), key
