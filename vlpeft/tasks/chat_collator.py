"""Model inputs from normalised chat records, through the processor's chat template only (no per-family code).

:class:`ChatCollator` renders each conversation with ``processor.apply_chat_template(messages, tokenize=False)``,
processes the texts with the records' images (loaded as RGB PIL images) and sets ``labels`` to the input ids of
every assistant turn (its text and end-of-turn token) and -100 elsewhere: system and user text, image placeholders,
padding. The assistant tokens are found by the template's ``{% generation %}`` markers where the processor maps them
onto its tokens, else by processing rendered prefixes (:mod:`vlpeft.tasks.chat_labels`). Training batches are
right-padded; ``max_length`` truncation never cuts into image placeholders (such a record is bad input,
``too_long``).

:meth:`ChatCollator.prompt_batch` gives what generation needs with the same rendering: the conversation without its
final assistant turn plus the generation prompt, left-padded, and that turn's text as the target.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jinja2 import TemplateError
from PIL import Image

from vlpeft.tasks.bad_input import BadInputError, BadInputPolicy
from vlpeft.tasks.chat_labels import (
    Span,
    check_right_padded,
    labels_from_spans,
    prefix_requests,
    spans_from_mask,
    spans_from_prefixes,
    trim_spans,
    truncate_per_token,
)
from vlpeft.tasks.chat_records import ROLES, message_text, template_messages
from vlpeft.tasks.images import load_image

logger = logging.getLogger(__name__)

LabelMethod = Literal["auto", "markers", "prefix"]
LABEL_METHODS: tuple[str, ...] = ("auto", "markers", "prefix")
IGNORE_INDEX = -100


@dataclass
class PromptBatch:
    """Generation inputs and their targets, in record order (records dropped as bad input are absent).

    Attributes:
        inputs: processor outputs, left-padded: ``input_ids`` / ``attention_mask`` of shape ``[B, P]`` and the
            image tensors; pass them to ``model.generate(**inputs)``.
        targets: the final assistant turn's text of each record (``None`` for a conversation that does not end
            with an assistant turn: then the whole conversation is the prompt).
        ids: the record ids.
    """

    inputs: dict[str, torch.Tensor]
    targets: list[str | None] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


@dataclass
class _Item:
    """One record ready to process: cleaned messages, RGB images, and its rendering."""

    id: str
    messages: list[dict[str, Any]]
    images: list[Image.Image]
    text: str = ""


class ChatCollator:
    """Collate chat records (``{"id", "images", "messages"}``, see :mod:`vlpeft.tasks.chat_records`) into training
    inputs for ``model(**batch)``.

    Args:
        processor: the model's processor (``AutoProcessor``); its chat template renders every conversation.
        max_length: longest sequence kept, in tokens after image expansion (``None``: no truncation). A longer
            record is cut at ``max_length`` when the cut keeps all its image placeholder tokens and at least one
            assistant token; otherwise it is bad input (``too_long``): raised, or dropped and counted.
        policy: bad-input policy for records (default: raise). Counts are per process (per data loader worker).
        label_method: ``"markers"`` (``{% generation %}`` markers via ``return_assistant_tokens_mask``),
            ``"prefix"`` (rendered prefixes), or ``"auto"``: markers when, on the first record with images, they
            give the same tokens as prefixes, else prefixes (:attr:`label_method_used` says which).
        processor_kwargs: extra keyword arguments for every processor call (e.g. image sizes).

    Calling it returns the processor outputs for the batch (``input_ids`` / ``attention_mask`` ``[B, L]``,
    right-padded, ``L <= max_length``; the family's image tensors) and ``labels`` ``[B, L]``.
    """

    def __init__(
        self,
        processor: Any,
        max_length: int | None = None,
        *,
        policy: BadInputPolicy | None = None,
        label_method: LabelMethod = "auto",
        processor_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if label_method not in LABEL_METHODS:
            raise ValueError(f"label_method must be one of {LABEL_METHODS}, got {label_method!r}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens or None, got {max_length}")
        self.processor = processor
        self.max_length = max_length
        self.policy = policy or BadInputPolicy()
        self.label_method = label_method
        self.label_method_used: str | None = None if label_method == "auto" else label_method
        self.processor_kwargs = dict(processor_kwargs or {})
        self._image_ids: set[int] | None = None

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    # ------------------------------------------------------------------ rendering and processing
    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False) -> str:
        """The chat template's text for ``messages`` (image parts become the family's placeholders)."""
        return self.processor.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def process(self, texts: Sequence[str], images: Sequence[Sequence[Image.Image]], padding_side: str,
                **kwargs: Any) -> dict[str, torch.Tensor]:
        """``processor(text=texts, images=images)`` padded on ``padding_side``, as tensors ``[B, L, ...]``."""
        call = self._call_kwargs(texts, padding_side)
        with self._padding_side(padding_side):
            if any(images):
                out = self.processor(text=list(texts), images=[list(i) for i in images], **call, **kwargs)
            else:
                out = self.processor(text=list(texts), **call, **kwargs)
        return dict(out)

    def _call_kwargs(self, texts: Sequence[str], padding_side: str) -> dict[str, Any]:
        call: dict[str, Any] = {"padding": True, "padding_side": padding_side, "return_tensors": "pt"}
        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and all(t.startswith(bos) for t in texts):
            call["add_special_tokens"] = False  # the template wrote it (as processor.apply_chat_template does)
        call.update(self.processor_kwargs)
        return call

    @contextlib.contextmanager
    def _padding_side(self, side: str) -> Iterator[None]:
        tokenizer = self.tokenizer
        previous = getattr(tokenizer, "padding_side", None)
        tokenizer.padding_side = side
        try:
            yield
        finally:
            tokenizer.padding_side = previous

    # ------------------------------------------------------------------ training batches
    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        items = self._prepare(records, render_full=True)
        while True:
            if not items:
                raise self._all_dropped(len(records))
            batch, spans = self._encode(items)
            too_long = self._too_long(items, batch, spans)
            if not too_long:
                break
            for i, why in too_long.items():
                self.policy.handle("too_long", f"record {items[i].id!r}: {why}")
            items = [item for i, item in enumerate(items) if i not in too_long]
        batch["labels"] = labels_from_spans(batch["input_ids"], spans)
        batch["labels"][batch["attention_mask"] == 0] = IGNORE_INDEX
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            batch = truncate_per_token(batch, self.max_length)
        return batch

    def _encode(self, items: list[_Item]) -> tuple[dict[str, torch.Tensor], list[list[Span]]]:
        """Processor outputs (right-padded, untruncated) and each row's assistant spans."""
        resolved = self._resolve_method(items)
        if self.label_method != "auto":
            candidates = [self.label_method]
        elif resolved == "markers":
            # e.g. Idefics3 / InternVL processors fail to batch their text replacement offsets when a record has no
            # image: such a batch is labelled by prefixes
            candidates = ["markers", "prefix"]
        elif resolved == "prefix":
            candidates = ["prefix"]
        else:  # not settled yet (no image so far): markers where the template defeats prefixes
            candidates = ["prefix", "markers"]
        for k, method in enumerate(candidates):
            try:
                if method == "markers":
                    batch, spans = self._encode_with_markers(items)
                else:
                    batch = self.process([i.text for i in items], [i.images for i in items], "right")
                    spans = self._prefix_spans(items, batch)
                for item, row_spans in zip(items, spans):
                    if not row_spans:
                        raise ValueError(f"record {item.id!r}: no assistant token found with label_method="
                                         f"{method!r} (does the chat template mark assistant text with "
                                         f"{{% generation %}}?)")
            except Exception as err:
                if k == len(candidates) - 1:
                    raise
                logger.debug("chat labels: %s failed on this batch (%s: %s); trying %s", method,
                             type(err).__name__, err, candidates[k + 1])
                continue
            check_right_padded(batch["attention_mask"])
            return batch, spans
        raise AssertionError("unreachable")

    def _encode_with_markers(self, items: list[_Item]) -> tuple[dict[str, torch.Tensor], list[list[Span]]]:
        texts = [i.text for i in items]
        kwargs = self._call_kwargs(texts, "right")
        if any(i.images for i in items):
            kwargs["images"] = [i.images for i in items]
        with self._padding_side("right"):
            out = self.processor.apply_chat_template(
                [i.messages for i in items], tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                processor_kwargs=kwargs)
        batch = dict(out)
        mask = torch.as_tensor(batch.pop("assistant_masks"))
        ids = batch["input_ids"]
        spans = [trim_spans(spans_from_mask(mask[r] * batch["attention_mask"][r]), ids[r].tolist(),
                            self.tokenizer.decode) for r in range(len(items))]
        return batch, spans

    def _prefix_spans(self, items: list[_Item], batch: Mapping[str, torch.Tensor]) -> list[list[Span]]:
        texts: list[str] = []
        images: list[list[Image.Image]] = []
        for item in items:
            for text, n_images in prefix_requests(item.messages, self.render, item.text, f"record {item.id!r}"):
                texts.append(text)
                images.append(item.images[:n_images])
        prefixes = self.process(texts, images, "right")
        lengths = prefixes["attention_mask"].sum(dim=1).tolist()
        prefix_ids = [row[:n] for row, n in zip(prefixes["input_ids"].tolist(), lengths)]
        spans, at = [], 0
        for row, item in enumerate(items):
            n = 2 * sum(1 for m in item.messages if m["role"] == "assistant")
            full = batch["input_ids"][row][: int(batch["attention_mask"][row].sum())].tolist()
            spans.append(trim_spans(spans_from_prefixes(full, prefix_ids[at:at + n]), full, self.tokenizer.decode))
            at += n
        return spans

    def _resolve_method(self, items: list[_Item]) -> str | None:
        """The label method; ``"auto"`` is settled on the first record with images (``None`` until then)."""
        if self.label_method_used is not None:
            return self.label_method_used
        probe = next((i for i in items if i.images), None)
        if probe is None:
            return None  # markers are only trusted once seen to agree with prefixes on a record with images
        prefix_error: ValueError | None = None
        prefix_batch = self.process([probe.text], [probe.images], "right")
        try:
            expected: list[list[Span]] | None = self._prefix_spans([probe], prefix_batch)
        except ValueError as err:  # the template does not render prefixes as prefixes
            expected, prefix_error = None, err
        try:
            marker_batch, found = self._encode_with_markers([probe])
        except Exception as err:  # processors without offsets / text replacement support fail in many ways
            logger.info("chat labels: {%% generation %%} markers unusable (%s: %s)", type(err).__name__, err)
            found = None
        if found is not None and expected is not None:
            agree = found == expected and torch.equal(marker_batch["input_ids"], prefix_batch["input_ids"])
        else:
            n_turns = sum(1 for m in probe.messages if m["role"] == "assistant")
            agree = found is not None and len(found[0]) == n_turns
        if not agree and expected is None:
            raise ValueError(f"cannot locate the assistant tokens: {prefix_error}") from prefix_error
        self.label_method_used = "markers" if agree else "prefix"
        logger.info("chat labels: assistant tokens located by %s", self.label_method_used)
        return self.label_method_used

    # ------------------------------------------------------------------ truncation
    def _too_long(self, items: list[_Item], batch: Mapping[str, torch.Tensor],
                  spans: list[list[Span]]) -> dict[int, str]:
        """Rows longer than ``max_length`` that cannot be cut there, with the reason."""
        if self.max_length is None:
            return {}
        out = {}
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for row, (item, n) in enumerate(zip(items, lengths)):
            if n <= self.max_length:
                continue
            limit = self.max_length
            if item.images:
                image_ids = self._image_token_ids(item.images[0])
                ids = batch["input_ids"][row][:n].tolist()
                last = max((p for p, t in enumerate(ids) if t in image_ids), default=None)
                if last is None or last >= limit:
                    where = "inside or before its image placeholders" if last is not None else \
                        "where its image placeholders cannot be told apart"
                    out[row] = (f"{n} tokens after image expansion exceed max_length={limit}, and cutting there "
                                f"would fall {where} (last image token at position {last}); expected a record "
                                f"whose images end before the cut (raise max_length or shorten the record)")
                    continue
            if not any(start < limit for start, _ in spans[row]):
                out[row] = (f"{n} tokens exceed max_length={limit} and no assistant token lies before the cut "
                            f"(first answer token at {spans[row][0][0]}); expected at least one answer token to "
                            f"train on (raise max_length)")
        return out

    def _image_token_ids(self, image: Image.Image) -> set[int]:
        """Special tokens that image placeholders expand into (found once, by processing a one-image message and
        the same message without the image)."""
        if self._image_ids is None:
            ids: set[int] = set()
            try:
                text = {"type": "text", "text": "a"}
                with_image = self.render([{"role": "user", "content": [{"type": "image"}, text]}])
                without = self.render([{"role": "user", "content": [text]}])
                a = self.process([with_image], [[image]], "right")["input_ids"][0].tolist()
                b = self.process([without], [[]], "right")["input_ids"][0].tolist()
                special = set(getattr(self.tokenizer, "all_special_ids", []))
                special |= set(getattr(self.tokenizer, "added_tokens_decoder", {}))
                ids = (set(a) - set(b)) & special
            except Exception as err:  # a template that needs an assistant turn, ...: fall back to the attribute
                logger.info("chat collator: image token probe failed (%s: %s)", type(err).__name__, err)
            token_id = getattr(self.processor, "image_token_id", None)
            if isinstance(token_id, int):
                ids.add(token_id)
            self._image_ids = ids
        return self._image_ids

    # ------------------------------------------------------------------ generation
    def prompt_batch(self, records: Sequence[Mapping[str, Any]]) -> PromptBatch:
        """Generation inputs rendered as in training: each conversation without its final assistant turn, with
        ``add_generation_prompt=True``, processed with the images of the kept turns, left-padded (``[B, P]``).
        The final assistant turn's text is the target."""
        items = self._prepare(records, render_full=False)
        if not items:
            raise self._all_dropped(len(records))
        texts, images, targets = [], [], []
        for item in items:
            messages, target = item.messages, None
            if messages[-1]["role"] == "assistant":
                messages, target = messages[:-1], message_text(messages[-1])
            n_images = sum(1 for m in messages for p in m["content"] if p["type"] == "image")
            texts.append(self.render(messages, add_generation_prompt=True))
            images.append(item.images[:n_images])
            targets.append(target)
        return PromptBatch(self.process(texts, images, "left"), targets, [i.id for i in items])

    def targets(self, records: Sequence[Mapping[str, Any]]) -> list[str | None]:
        """The final assistant turn's text of each record (``None`` when the last turn is not an assistant's)."""
        return [message_text(m[-1]) if m and m[-1]["role"] == "assistant" else None
                for m in (template_messages(r.get("messages") or []) for r in records)]

    # ------------------------------------------------------------------ records
    def _all_dropped(self, n: int) -> BadInputError:
        """The error for a batch left empty by a skipping policy (a model cannot take zero rows)."""
        reason = self.policy.counts.most_common(1)[0][0] if self.policy.counts else "malformed_record"
        return BadInputError(f"all {n} record(s) of this batch were dropped as bad input; {self.policy.report()}",
                             reason)

    def _prepare(self, records: Sequence[Mapping[str, Any]], *, render_full: bool) -> list[_Item]:
        items = []
        for index, record in enumerate(records):
            record_id = str(record.get("id", index)) if isinstance(record, Mapping) else str(index)
            try:
                item = self._item(record, record_id)
                if render_full:
                    if not any(m["role"] == "assistant" and message_text(m).strip() for m in item.messages):
                        raise BadInputError(f"record {record_id!r}: field 'messages': no assistant turn with text; "
                                            f"expected at least one answer to train on", "malformed_record")
                    item.text = self.render(item.messages)
            except BadInputError as err:
                self.policy.handle(err.reason, str(err))
                continue
            except TemplateError as err:  # e.g. "roles must alternate": the template refuses this conversation
                self.policy.handle("malformed_record", f"record {record_id!r}: the chat template refused the "
                                                       f"conversation: {err}")
                continue
            items.append(item)
        return items

    def _item(self, record: Mapping[str, Any], record_id: str) -> _Item:
        where = f"record {record_id!r}"
        if not isinstance(record, Mapping) or not isinstance(record.get("messages"), (list, tuple)):
            raise BadInputError(f"{where}: field 'messages': expected a list of messages (a normalised chat record "
                                f"with 'id', 'images', 'messages')", "malformed_record")
        try:
            messages = template_messages(record["messages"])
        except (AttributeError, TypeError) as err:
            raise BadInputError(f"{where}: field 'messages': {err}; expected messages with role and a content list "
                                f"of image/text parts", "malformed_record") from err
        if not messages:
            raise BadInputError(f"{where}: field 'messages': empty; expected a conversation", "malformed_record")
        for k, message in enumerate(messages):
            if message["role"] not in ROLES:
                raise BadInputError(f"{where}: field 'messages[{k}].role': unknown role {message['role']!r}; "
                                    f"expected one of {list(ROLES)}", "malformed_record")
        sources = list(record.get("images") or [])
        parts = sum(1 for m in messages for p in m["content"] if p["type"] == "image")
        if parts != len(sources):
            raise BadInputError(f"{where}: field 'images': {len(sources)} image(s) for {parts} image part(s); "
                                f"expected equal counts", "malformed_record")
        images = [s.convert("RGB") if isinstance(s, Image.Image) else load_image(s, f"{where} field 'images[{k}]'")
                  for k, s in enumerate(sources)]
        return _Item(record_id, messages, images)
