"""The normalised chat record, and the checks that turn one raw conversation into it.

Every chat data format (:mod:`vlpeft.tasks.chat_data`) is read into records of one form::

    {"id": str,
     "images": [absolute image paths, in the order of the image parts],
     "messages": [{"role": "system" | "user" | "assistant",
                   "content": [{"type": "image"} | {"type": "text", "text": str}, ...]}, ...]}

Two raw record styles are understood:

- *messages* (TRL, ms-swift): ``messages`` with ``role`` and ``content`` (a list of ``{"type": "image"}`` /
  ``{"type": "text", "text": ...}`` parts, or a string in which ``<image>`` marks image positions) and an ``images``
  list of paths (``image`` is accepted too);
- *LLaVA / ShareGPT* (LLaMA-Factory): ``conversations`` with ``from`` (``human``/``gpt``/``system``) and ``value``
  (``<image>`` placeholders), and ``image`` (a path or a list of paths; absent for text-only records).

:func:`normalise_chat_record` raises :class:`RecordProblem` naming the offending field and what was expected; the
readers turn it into a :class:`~vlpeft.tasks.bad_input.BadInputPolicy` decision naming the file and the record.
:func:`single_turn_record` builds a record from one (images, prompt, answer) example, so that VQA, SNLI-VE and
captioning examples are rendered as single-turn conversations.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

IMAGE_PLACEHOLDER = "<image>"
ROLES: tuple[str, ...] = ("system", "user", "assistant")
#: LLaVA / ShareGPT ``from`` values and the roles they stand for.
LLAVA_ROLES: dict[str, str] = {
    "human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
}


class ChatPart(TypedDict, total=False):
    """One content part: ``{"type": "image"}`` or ``{"type": "text", "text": str}``."""

    type: Literal["image", "text"]
    text: str


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: list[ChatPart]


class ChatRecord(TypedDict):
    """A normalised conversation: ``len(images)`` equals the number of image parts over all messages."""

    id: str
    images: list[Any]  # absolute paths (str); records built in memory may hold PIL images
    messages: list[ChatMessage]


class RecordProblem(Exception):
    """A problem in one raw record: ``field`` (e.g. ``"messages[2].content[0].text"``) and what is wrong.

    ``reason`` is the :data:`~vlpeft.tasks.bad_input.BAD_INPUT_REASONS` entry it is counted under.
    """

    def __init__(self, field: str, problem: str, reason: str = "malformed_record") -> None:
        super().__init__(f"field {field!r}: {problem}")
        self.field = field
        self.problem = problem
        self.reason = reason


def record_label(source: str, index: int, record_id: str | None) -> str:
    """``"'data.json' record 3 (id 'abc')"``: how messages name a record."""
    named = f" (id {record_id!r})" if record_id is not None else ""
    return f"{source!r} record {index}{named}"


def raw_record_id(raw: Any) -> str | None:
    """The ``id`` of a raw record as a string, ``None`` when it has none usable (for messages only)."""
    if isinstance(raw, Mapping):
        value = raw.get("id")
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    return None


def normalise_chat_record(raw: Any, *, index: int, images_root: str | os.PathLike) -> ChatRecord:
    """Check one raw record (messages or LLaVA style) and return its normalised form.

    Args:
        raw: the record as read (a mapping; absent optional fields may be ``None``, as ``datasets`` rows have them).
        index: its position in the file (the id when it has none).
        images_root: folder that relative image paths are resolved against.

    Raises:
        RecordProblem: the first problem found: not a mapping, neither ``messages`` nor ``conversations``, a field of
            the wrong type, an unknown role, an empty message or assistant turn, an image part in an assistant turn,
            a system turn after the start, no user turn before the first assistant turn, no assistant turn or one
            that is not last, an image count that differs from the number of image parts.
    """
    if not isinstance(raw, Mapping):
        raise RecordProblem("<record>", f"expected a JSON object (mapping), got {type(raw).__name__}")
    record_id = _record_id(raw, index)
    if raw.get("messages") is not None:
        messages = _messages_from_messages(raw["messages"])
    elif raw.get("conversations") is not None:
        messages = _messages_from_llava(raw["conversations"])
    else:
        present = sorted(str(k) for k, v in raw.items() if v is not None)
        raise RecordProblem("messages", f"missing; expected a 'messages' list (role + content) or a LLaVA "
                                        f"'conversations' list (from + value); the record has {present}")
    _check_conversation(messages, "messages" if raw.get("messages") is not None else "conversations")
    field = image_field(raw)
    images = _image_paths(raw.get(field), field, Path(images_root))
    parts = sum(1 for m in messages for p in m["content"] if p["type"] == "image")
    if parts != len(images):
        raise RecordProblem(field, f"{len(images)} image path(s) for {parts} image part(s) / {IMAGE_PLACEHOLDER!r} "
                                   f"placeholder(s) in the conversation; expected equal counts")
    return {"id": record_id, "images": images, "messages": messages}


def image_field(raw: Mapping[str, Any]) -> str:
    """The field a raw record lists its images in: ``images`` (messages style) or ``image`` (LLaVA style); the
    other name is accepted when only it is present."""
    llava = raw.get("messages") is None and raw.get("conversations") is not None
    first, second = ("image", "images") if llava else ("images", "image")
    return second if raw.get(first) is None and raw.get(second) is not None else first


def single_turn_record(
    images: Sequence[str | os.PathLike | Any],
    prompt: str,
    target: str | None = None,
    *,
    record_id: str = "",
    system: str | None = None,
) -> ChatRecord:
    """A one-question conversation: the user turn holds the images (first, in order) then ``prompt``; the
    assistant turn holds ``target`` (left out when ``None``, for inference-only records).

    Paths are made absolute; PIL images are kept as they are (the collator accepts both).
    """
    content: list[ChatPart] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": prompt})
    messages: list[ChatMessage] = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": content})
    if target is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": target}]})
    paths = [os.path.abspath(os.fspath(i)) if isinstance(i, (str, os.PathLike)) else i for i in images]
    return {"id": record_id, "images": paths, "messages": messages}


def split_placeholders(text: str) -> list[ChatPart]:
    """``"<image>\\nWhat is it?"`` -> ``[{"type": "image"}, {"type": "text", "text": "What is it?"}]``.

    Text around placeholders is stripped of surrounding whitespace (the ``"<image>\\n"`` convention) and blank
    segments are dropped; a string without placeholders is one text part, kept as it is.
    """
    if IMAGE_PLACEHOLDER not in text:
        return [{"type": "text", "text": text}] if text.strip() else []
    parts: list[ChatPart] = []
    for i, segment in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            parts.append({"type": "image"})
        if segment.strip():
            parts.append({"type": "text", "text": segment.strip()})
    return parts


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a normalised message (its text parts joined)."""
    return "".join(p["text"] for p in message["content"] if p.get("type") == "text")


def template_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Messages as the template expects them: content lists of ``{"type": "image"}`` / ``{"type": "text",
    "text"}`` parts (Arrow rows' ``None`` fields dropped, string content split at ``<image>``)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts = split_placeholders(content)
        else:
            parts = [{"type": "image"} if p.get("type") == "image" else {"type": "text", "text": p.get("text") or ""}
                     for p in content or []]
        out.append({"role": message.get("role"), "content": parts})
    return out


def _record_id(raw: Mapping[str, Any], index: int) -> str:
    value = raw.get("id")
    if value is None:
        return str(index)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordProblem("id", f"has type {type(value).__name__}; expected a string or an integer")
    return str(value)


def _messages_from_messages(value: Any) -> list[ChatMessage]:
    if not isinstance(value, (list, tuple)):
        raise RecordProblem("messages", f"has type {type(value).__name__}; expected a list of messages")
    out: list[ChatMessage] = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise RecordProblem(where, f"has type {type(message).__name__}; expected an object with role and content")
        role = message.get("role")
        if not isinstance(role, str):
            raise RecordProblem(f"{where}.role", f"is {_describe(role)}; expected one of {list(ROLES)}")
        if role not in ROLES:
            raise RecordProblem(f"{where}.role", f"unknown role {role!r}; expected one of {list(ROLES)}")
        out.append({"role": role, "content": _content(message.get("content"), f"{where}.content")})  # type: ignore[typeddict-item]
    return out


def _content(value: Any, where: str) -> list[ChatPart]:
    if isinstance(value, str):
        return split_placeholders(value)
    if not isinstance(value, (list, tuple)):
        raise RecordProblem(where, f"is {_describe(value)}; expected a string or a list of image/text parts")
    parts: list[ChatPart] = []
    for j, part in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(part, Mapping):
            raise RecordProblem(at, f"has type {type(part).__name__}; expected {{'type': 'image'}} or "
                                    f"{{'type': 'text', 'text': ...}}")
        kind = part.get("type")
        if kind == "image":
            parts.append({"type": "image"})
        elif kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise RecordProblem(f"{at}.text", f"is {_describe(text)}; expected a string")
            if IMAGE_PLACEHOLDER in text:
                raise RecordProblem(f"{at}.text", f"contains {IMAGE_PLACEHOLDER!r}; in a content list an image is "
                                                  f"a {{'type': 'image'}} part")
            parts.append({"type": "text", "text": text})
        else:
            raise RecordProblem(f"{at}.type", f"is {kind!r}; expected 'image' or 'text'")
    return parts


def _messages_from_llava(value: Any) -> list[ChatMessage]:
    if not isinstance(value, (list, tuple)):
        raise RecordProblem("conversations", f"has type {type(value).__name__}; expected a list of turns")
    out: list[ChatMessage] = []
    for i, turn in enumerate(value):
        where = f"conversations[{i}]"
        if not isinstance(turn, Mapping):
            raise RecordProblem(where, f"has type {type(turn).__name__}; expected an object with from and value")
        speaker = turn.get("from")
        if not isinstance(speaker, str) or speaker not in LLAVA_ROLES:
            raise RecordProblem(f"{where}.from", f"unknown role {speaker!r}; expected one of {list(LLAVA_ROLES)}")
        text = turn.get("value")
        if not isinstance(text, str):
            raise RecordProblem(f"{where}.value", f"is {_describe(text)}; expected a string")
        out.append({"role": LLAVA_ROLES[speaker], "content": split_placeholders(text)})  # type: ignore[typeddict-item]
    return out


def _check_conversation(messages: list[ChatMessage], key: str) -> None:
    if not messages:
        raise RecordProblem(key, "is empty; expected a conversation with an assistant turn")
    seen_user = False
    for i, message in enumerate(messages):
        where, role = f"{key}[{i}]", message["role"]
        has_image = any(p["type"] == "image" for p in message["content"])
        has_text = any(p["type"] == "text" and p["text"].strip() for p in message["content"])
        if role == "assistant":
            if has_image:
                raise RecordProblem(where, "assistant turn holds an image; expected images in system/user turns only")
            if not has_text:
                raise RecordProblem(where, "empty assistant turn; expected non-blank answer text")
            if not seen_user:
                raise RecordProblem(where, "assistant turn before any user turn; expected a user turn first")
        elif not has_image and not has_text:
            raise RecordProblem(where, f"empty {role} turn; expected text or an image")
        if role == "system" and i > 0:
            raise RecordProblem(f"{where}.role", "system turn after the start; expected it as the first turn only")
        seen_user = seen_user or role == "user"
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordProblem(key, "has no assistant turn; expected at least one answer to train on")
    if messages[-1]["role"] != "assistant":
        raise RecordProblem(f"{key}[{len(messages) - 1}]", f"last turn is a {messages[-1]['role']} turn; expected "
                                                           f"the conversation to end with an assistant turn")


def _image_paths(value: Any, field: str, root: Path) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise RecordProblem(field, f"is {_describe(value)}; expected an image path or a list of image paths")
    paths = []
    for k, item in enumerate(items):
        if not isinstance(item, (str, os.PathLike)) or not os.fspath(item).strip():
            raise RecordProblem(f"{field}[{k}]", f"is {_describe(item)}; expected an image file path "
                                                 f"(absolute or relative to the images root)")
        path = Path(os.fspath(item))
        paths.append(os.path.abspath(path if path.is_absolute() else root / path))
    return paths


def _describe(value: Any) -> str:
    if value is None:
        return "missing"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else f"the string {value[:40]!r}"
    return f"of type {type(value).__name__}"
