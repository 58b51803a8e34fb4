"""Conversation datasets (LLaVA JSON; JSON / JSON Lines / Parquet / save_to_disk with messages + images) read into
the same normalised records; every malformed case raises naming file, record and field, or is skipped and counted."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import datasets
import pytest
from PIL import Image

from vlpeft.tasks.bad_input import BadInputError, BadInputPolicy
from vlpeft.tasks.chat_data import detect_chat_format, load_chat_dataset, read_chat_records
from vlpeft.tasks.chat_records import single_turn_record, split_placeholders


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    for name, color in (("a.png", (255, 0, 0)), ("b.png", (0, 255, 0)), ("c.png", (0, 0, 255))):
        Image.new("RGB", (8, 6), color).save(tmp_path / "img" / name)
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    return tmp_path


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


IMAGE = {"type": "image"}

#: The three conversations every format holds: one image, one turn; system + two images + two turns; text only.
MESSAGES: list[dict[str, Any]] = [
    {"id": "r0", "images": ["img/a.png"], "messages": [
        {"role": "user", "content": [IMAGE, _text("what is in the image ?")]},
        {"role": "assistant", "content": [_text("a red square")]}]},
    {"id": "r1", "images": ["img/b.png", "img/c.png"], "messages": [
        {"role": "system", "content": [_text("answer in short")]},
        {"role": "user", "content": [IMAGE, _text("and")]},
        {"role": "user", "content": [IMAGE, _text("which is left ?")]},
        {"role": "assistant", "content": [_text("the green one")]},
        {"role": "user", "content": [_text("and the colour of the right one ?")]},
        {"role": "assistant", "content": [_text("blue")]}]},
    {"id": "r2", "images": [], "messages": [
        {"role": "user", "content": [_text("how many are there ?")]},
        {"role": "assistant", "content": [_text("two")]}]},
]

LLAVA: list[dict[str, Any]] = [
    {"id": "r0", "image": "img/a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is in the image ?"},
        {"from": "gpt", "value": "a red square"}]},
    {"id": "r1", "image": ["img/b.png", "img/c.png"], "conversations": [
        {"from": "system", "value": "answer in short"},
        {"from": "human", "value": "<image>\nand"},
        {"from": "human", "value": "<image> which is left ?"},
        {"from": "gpt", "value": "the green one"},
        {"from": "human", "value": "and the colour of the right one ?"},
        {"from": "gpt", "value": "blue"}]},
    {"id": "r2", "conversations": [
        {"from": "human", "value": "how many are there ?"},
        {"from": "gpt", "value": "two"}]},
]


def _expected(root: Path) -> list[dict[str, Any]]:
    out = copy.deepcopy(MESSAGES)
    for record in out:
        record["images"] = [str((root / p).absolute()) for p in record["images"]]
    return out


def _write_json(path: Path, rows: Any) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _string_content(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ms-swift style: string contents with ``<image>`` placeholders."""
    out = copy.deepcopy(rows)
    for record in out:
        for message in record["messages"]:
            message["content"] = " ".join("<image>" if p["type"] == "image" else p["text"] for p in message["content"])
    return out


def _writers(data_dir: Path) -> dict[str, Path]:
    cache = data_dir / "cache"
    paths = {
        "llava_json": _write_json(data_dir / "llava.json", LLAVA),
        "messages_json": _write_json(data_dir / "messages.json", MESSAGES),
        "messages_json_string_content": _write_json(data_dir / "swift.json", _string_content(MESSAGES)),
        "messages_jsonl": _write_jsonl(data_dir / "messages.jsonl", MESSAGES),
        "llava_jsonl_sniffed": _write_jsonl(data_dir / "llava.txt", LLAVA),
    }
    table = datasets.Dataset.from_list(copy.deepcopy(MESSAGES))
    table.to_parquet(str(data_dir / "messages.parquet"))
    paths["parquet"] = data_dir / "messages.parquet"
    table.save_to_disk(str(data_dir / "saved"))
    paths["save_to_disk"] = data_dir / "saved"
    datasets.DatasetDict({"train": table}).save_to_disk(str(data_dir / "saved_dict"))
    paths["save_to_disk_dict"] = data_dir / "saved_dict"
    assert cache  # the datasets cache lives in the test folder (see _read)
    return paths


def _read(path: Path, **kwargs: Any) -> list[dict[str, Any]]:
    return read_chat_records(path, cache_dir=path.parent / "cache", **kwargs)


def test_every_format_reads_to_the_same_records(data_dir: Path) -> None:
    expected = _expected(data_dir)
    for name, path in _writers(data_dir).items():
        records = _read(path, images_root=data_dir)
        assert records == expected, name


def test_format_detection(data_dir: Path) -> None:
    paths = _writers(data_dir)
    assert detect_chat_format(paths["llava_json"]) == "json"
    assert detect_chat_format(paths["messages_jsonl"]) == "jsonl"
    assert detect_chat_format(paths["llava_jsonl_sniffed"]) == "jsonl"
    assert detect_chat_format(paths["parquet"]) == "parquet"
    assert detect_chat_format(paths["save_to_disk"]) == "arrow"
    (data_dir / "data.bin").write_bytes((data_dir / "messages.parquet").read_bytes())
    assert detect_chat_format(data_dir / "data.bin") == "parquet"
    (data_dir / "list.dat").write_text(json.dumps(LLAVA, indent=2))
    assert detect_chat_format(data_dir / "list.dat") == "json"


def test_file_level_errors_name_the_file(data_dir: Path) -> None:
    (data_dir / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        _read(data_dir / "notes.txt")
    (data_dir / "empty_folder").mkdir()
    with pytest.raises(ValueError, match=r"empty_folder.*save_to_disk"):
        _read(data_dir / "empty_folder")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.json"):
        _read(data_dir / "nowhere.json")
    _write_json(data_dir / "other.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"other\.json.*'messages' or 'conversations'"):
        _read(data_dir / "other.json")
    _write_json(data_dir / "dict.json", {"data": LLAVA})
    with pytest.raises(ValueError, match=r"dict\.json"):
        _read(data_dir / "dict.json")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(MESSAGES[:1]),
                          "test": datasets.Dataset.from_list(MESSAGES[:1])}).save_to_disk(str(data_dir / "two"))
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\]"):
        _read(data_dir / "two")
    assert len(_read(data_dir / "two", split="test", images_root=data_dir)) == 1


def test_relative_paths_resolve_against_the_images_root(data_dir: Path) -> None:
    rows = copy.deepcopy(LLAVA[:1])
    rows[0]["image"] = "a.png"
    path = _write_json(data_dir / "rel.json", rows)
    assert _read(path, images_root=data_dir / "img")[0]["images"] == [str(data_dir / "img" / "a.png")]
    with pytest.raises(BadInputError, match=r"rel\.json.*record 0.*'r0'.*'image\[0\]'.*does not exist"):
        _read(path)  # default root: the folder holding the file
    rows[0]["image"] = str(data_dir / "img" / "a.png")  # absolute paths stay
    path = _write_json(data_dir / "abs.json", rows)
    assert _read(path)[0]["images"] == [str(data_dir / "img" / "a.png")]


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def change(record: dict[str, Any]) -> dict[str, Any]:
        record = copy.deepcopy(record)
        target = record
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return record
    return change


# (name, base rows, change to record 1, reason, field named in the message)
MALFORMED = [
    ("missing image", MESSAGES, _set(("images", 1), "img/gone.png"), "missing_image", "images[1]"),
    ("llava missing image", LLAVA, _set(("image",), ["img/b.png", "img/none.png"]), "missing_image", "image[1]"),
    ("placeholders differ from images", LLAVA, _set(("image",), ["img/b.png"]), "malformed_record", "'image'"),
    ("image parts differ from images", MESSAGES, _set(("images",), ["img/b.png", "img/c.png", "img/a.png"]),
     "malformed_record", "'images'"),
    ("empty assistant turn", MESSAGES, _set(("messages", 3, "content"), [_text("  ")]), "malformed_record",
     "messages[3]"),
    ("unknown role", MESSAGES, _set(("messages", 4, "role"), "tool"), "malformed_record", "messages[4].role"),
    ("unknown llava speaker", LLAVA, _set(("conversations", 3, "from"), "bot"), "malformed_record",
     "conversations[3].from"),
    ("no assistant turn", MESSAGES,
     _set(("messages",), [{"role": "user", "content": [IMAGE, IMAGE, _text("hi")]}]), "malformed_record",
     "'messages'"),
    ("messages not a list", MESSAGES, _set(("messages",), "hello"), "malformed_record", "'messages'"),
    ("unknown part type", MESSAGES, _set(("messages", 1, "content", 0), {"type": "video"}), "malformed_record",
     "messages[1].content[0].type"),
    ("text not a string", MESSAGES, _set(("messages", 1, "content", 1), {"type": "text", "text": 3}),
     "malformed_record", "messages[1].content[1].text"),
    ("image in an assistant turn", MESSAGES, _set(("messages", 5, "content"), [IMAGE, _text("blue")]),
     "malformed_record", "messages[5]"),
    ("system turn later", MESSAGES, _set(("messages", 4, "role"), "system"), "malformed_record", "messages[4].role"),
    ("images not paths", MESSAGES, _set(("images",), [1, 2]), "malformed_record", "images[0]"),
    ("neither messages nor conversations", MESSAGES, lambda r: {"id": r["id"], "text": "x"}, "malformed_record",
     "'messages'"),
    ("record not an object", MESSAGES, lambda r: "just a string", "malformed_record", "<record>"),
]


@pytest.mark.parametrize("name, rows, change, reason, field", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_record_raises_or_is_skipped(data_dir: Path, name: str, rows: list[dict[str, Any]], change: Any,
                                               reason: str, field: str) -> None:
    bad = [rows[0], change(rows[1]), rows[2]]
    path = _write_json(data_dir / "bad.json", bad)
    with pytest.raises(BadInputError) as raised:
        _read(path, images_root=data_dir)
    message = str(raised.value)
    assert raised.value.reason == reason
    assert "bad.json" in message and "record 1" in message and field in message, message
    if isinstance(bad[1], dict) and "id" in bad[1]:
        assert "'r1'" in message
    assert "expected" in message

    policy = BadInputPolicy("skip")
    records = _read(path, images_root=data_dir, policy=policy)
    assert [r["id"] for r in records] == ["r0", "r2"]
    assert dict(policy.counts) == {reason: 1}


def test_malformed_jsonl_line_is_skipped_and_counted(data_dir: Path) -> None:
    path = data_dir / "bad.jsonl"
    path.write_text(json.dumps(MESSAGES[0]) + "\n{not json\n" + json.dumps(MESSAGES[2]) + "\n")
    with pytest.raises(BadInputError, match=r"bad\.jsonl.*line 2"):
        _read(path, images_root=data_dir)
    policy = BadInputPolicy("skip")
    assert [r["id"] for r in _read(path, images_root=data_dir, policy=policy)] == ["r0", "r2"]
    assert dict(policy.counts) == {"malformed_record": 1}


def test_corrupt_image_with_decode_check(data_dir: Path) -> None:
    rows = copy.deepcopy(MESSAGES)
    rows[0]["images"] = ["img/broken.png"]
    path = _write_json(data_dir / "corrupt.json", rows)
    assert len(_read(path, images_root=data_dir)) == 3  # "exists" does not open the files
    with pytest.raises(BadInputError, match=r"corrupt image file.*broken\.png.*record 0"):
        _read(path, images_root=data_dir, image_check="decode")
    policy = BadInputPolicy("skip")
    assert len(_read(path, images_root=data_dir, image_check="decode", policy=policy)) == 2
    assert dict(policy.counts) == {"corrupt_image": 1}


def test_nothing_left_is_an_empty_split(data_dir: Path) -> None:
    path = _write_json(data_dir / "none.json", [_set(("images", 0), "img/gone.png")(MESSAGES[0])])
    policy = BadInputPolicy("skip")
    assert _read(path, images_root=data_dir, policy=policy) == []
    assert dict(policy.counts) == {"missing_image": 1, "empty_split": 1}


def test_load_chat_dataset_and_ids(data_dir: Path) -> None:
    rows = copy.deepcopy(LLAVA)
    del rows[0]["id"]
    rows[1]["id"] = 17
    path = _write_json(data_dir / "ids.json", rows)
    table = load_chat_dataset(path, images_root=data_dir, cache_dir=data_dir / "cache")
    assert isinstance(table, datasets.Dataset) and table["id"] == ["0", "17", "r2"]
    assert table[1]["messages"][1]["content"][0] == {"type": "image", "text": None}
    assert table[1]["images"] == _expected(data_dir)[1]["images"]


def test_single_turn_record_and_placeholders(tmp_path: Path) -> None:
    record = single_turn_record(["x.png", tmp_path / "y.png"], "what colour ?", "red", record_id="q1",
                                system="be short")
    assert record["images"] == [str(Path("x.png").absolute()), str(tmp_path / "y.png")]
    assert record["messages"] == [
        {"role": "system", "content": [_text("be short")]},
        {"role": "user", "content": [IMAGE, IMAGE, _text("what colour ?")]},
        {"role": "assistant", "content": [_text("red")]}]
    assert single_turn_record([], "q")["messages"] == [{"role": "user", "content": [_text("q")]}]
    assert split_placeholders("<image>\n<image> left or right ?\n") == [IMAGE, IMAGE, _text("left or right ?")]
    assert split_placeholders("a <image> b") == [_text("a"), IMAGE, _text("b")]
    assert split_placeholders("  plain text ") == [_text("  plain text ")]
