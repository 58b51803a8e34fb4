"""Bind tasks to models driven by their processor's chat template (the ``chat_template`` family).

- VQA, SNLI-VE and captions keep their framing (prompt templates, answer weighting, label words) and are rendered
  as single-turn conversations (:class:`~vlpeft.tasks.chat_tasks.ChatTaskCollator`); ``rank`` and ``generate``
  inference render the same conversation without the assistant turn.
- ``task.type: chat`` trains on conversation files (:mod:`vlpeft.tasks.chat_data`), loss on every assistant
  turn. Evaluation reports the loss on the assistant tokens (``loss``, the default selection metric: lower is
  better) and, when every final assistant turn is a short answer (at most :data:`SHORT_ANSWER_WORDS` words),
  generates the final answers and scores ``exact_match`` with the official VQA answer normalisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from datasets.utils import logging as datasets_logging

from vlpeft.metrics.vqa_normalize import normalize_answer
from vlpeft.tasks.bad_input import BadInputError, BadInputPolicy
from vlpeft.tasks.chat_collator import ChatCollator
from vlpeft.tasks.chat_data import read_chat_records
from vlpeft.tasks.chat_tasks import (
    ChatTaskCollator,
    chat_generate,
    chat_rank,
    conversation_losses,
    prompt_records,
)
from vlpeft.tasks.framing import (
    DEFAULT_CAPTION_PROMPT,
    DEFAULT_ENTAILMENT_PROMPT,
    DEFAULT_LABEL_WORDS,
    DEFAULT_VQA_PROMPT,
    caption_examples,
    clean_hypothesis,
    entailment_examples,
    format_prompt,
    vqa_examples,
)
from vlpeft.tasks.losses import TokenObjective, WeightedSequenceObjective
from vlpeft.tasks.nlvr2 import DEFAULT_NLVR2_PROMPT, DEFAULT_NLVR2_WORDS, nlvr2_examples
from vlpeft.training.config import ConfigError, TrainConfig
from vlpeft.training.task_binding import (
    DEFAULT_METRICS,
    VQA_LIKE_TASKS,
    TaskBinding,
    _caption_score,
    _entailment_score,
    _generation_kwargs,
    _gqa_score,
    _nlvr2_score,
    _vqa_score,
    allowed_inference,
)

__all__ = ["SHORT_ANSWER_WORDS", "bind_chat_template", "load_chat_datasets"]

#: Final assistant turns of at most this many words count as short answers (scored by exact match).
SHORT_ANSWER_WORDS = 5


def load_chat_datasets(config: TrainConfig, policy: Any, image_check: str = "decode") -> list[Any]:
    """(train, eval, test) conversation records of ``task.type: chat`` (``None`` for files not given); with
    ``image_check="decode"`` every image is decoded here, before any model is loaded (see
    :func:`~vlpeft.training.task_binding.load_datasets`)."""
    task = config.task
    root = config.resolve_path(task.images) if task.images is not None else None
    out = []
    for split in ("train", "eval", "test"):
        path = config.resolve_path(getattr(task, split))
        if path is None:
            out.append(None)
            continue
        try:
            with _quiet_datasets():
                out.append(read_chat_records(path, images_root=root, policy=policy,
                                              image_check=image_check))
        except BadInputError:
            raise
        except (ValueError, OSError) as error:  # the whole file: unknown format, unreadable
            raise ConfigError(f"task.{split}: {error}") from error
    return out


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No "Generating train split" progress bars from ``datasets`` while reading the files."""
    enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            datasets_logging.enable_progress_bar()


def _short_answers(chat: Any, records: Sequence[Any]) -> bool:
    targets = chat.targets(records)
    return bool(targets) and all(t is not None and len(t.split()) <= SHORT_ANSWER_WORDS for t in targets)


def _bind_conversations(config: TrainConfig, chat: Any, datasets: tuple[Any, Any, Any]) -> Any:
    batch_size = config.optim.eval_batch_size or config.optim.batch_size
    train, evaluation, test = datasets

    def predict(model, dataset, indices=None):
        indices = list(range(len(dataset))) if indices is None else list(indices)
        records = [dataset[i] for i in indices]
        generate = _short_answers(chat, records)
        training = model.training
        model.eval()
        out = []
        try:
            for start in range(0, len(records), batch_size):
                chunk = records[start:start + batch_size]
                nll, count = conversation_losses(model, chat, chunk)
                answers = chat_generate(model, chat, chunk, **_generation_kwargs(config)) if generate else None
                for j, record in enumerate(chunk):
                    row = {"id": record["id"], "nll": float(nll[j]), "tokens": int(count[j])}
                    if answers is not None:
                        row["prediction"] = answers[j]
                    out.append(row)
        finally:
            model.train(training)
        return out

    def score(records, dataset):
        tokens = sum(r["tokens"] for r in records)
        scores = {"loss": sum(r["nll"] for r in records) / max(tokens, 1)}
        if records and all("prediction" in r for r in records):
            gold = {r["id"]: t for r, t in zip(dataset, chat.targets(list(dataset)), strict=True)}
            hits = [normalize_answer(r["prediction"]) == normalize_answer(gold[r["id"]]) for r in records]
            scores["exact_match"] = 100.0 * sum(hits) / len(hits)
        return scores

    return TaskBinding(train, evaluation, test, chat, TokenObjective(config.optim.label_smoothing), predict, score,
                       "loss")


def bind_chat_template(config: TrainConfig, processor: Any, datasets: tuple[Any, Any, Any],
                       answers: list[str] | None) -> Any:
    """The :class:`~vlpeft.training.task_binding.TaskBinding` of ``config.task`` for a chat-template model."""
    task = config.task
    policy = BadInputPolicy(task.bad_input)
    chat = ChatCollator(processor, task.max_length, policy=policy)
    if task.type == "chat":
        return _bind_conversations(config, chat, datasets)
    mode = task.inference or allowed_inference(task.type, task.framing, "chat_template")[0]
    batch_size = config.optim.eval_batch_size or config.optim.batch_size
    generation = _generation_kwargs(config)
    train, evaluation, test = datasets
    objective = TokenObjective(config.optim.label_smoothing)

    def batches(dataset, indices):
        indices = list(range(len(dataset))) if indices is None else list(indices)
        for start in range(0, len(indices), batch_size):
            yield [dataset[i] for i in indices[start:start + batch_size]]

    def answers_of(model, items, prompts, candidates, top_k):
        if mode == "rank":
            return [candidates[c] for c in chat_rank(model, chat, items, prompts, candidates, top_k)]
        return chat_generate(model, chat, prompt_records(items, prompts), **generation)

    def run(model, fn):
        training = model.training
        model.eval()
        try:
            return fn()
        finally:
            model.train(training)

    if task.type in VQA_LIKE_TASKS:
        template = task.prompt or DEFAULT_VQA_PROMPT
        weighted = task.answer_weighting != "most_common"
        collate = ChatTaskCollator(chat, lambda items: vqa_examples(items, template, task.answer_weighting),
                                   weighted=weighted)
        if weighted:
            objective = WeightedSequenceObjective(config.optim.label_smoothing)

        def predict(model, dataset, indices=None):
            def go():
                out = []
                for items in batches(dataset, indices):
                    prompts = [format_prompt(template, question=it["question"].strip()) for it in items]
                    picked = answers_of(model, items, prompts, answers or [], config.eval.rank_top_k)
                    out.extend({"question_id": it["question_id"], "answer": a} for it, a in zip(items, picked))
                return out
            return run(model, go)

        def score(records, dataset):
            if task.type == "gqa":
                return _gqa_score(records, dataset)
            return _vqa_score(records, dataset, answers if mode == "rank" else None)

        return TaskBinding(train, evaluation, test, collate, objective, predict, score, DEFAULT_METRICS[task.type],
                           None, {"answer_list": answers})
    if task.type == "nlvr2":
        return _bind_nlvr2(config, chat, datasets, batches, run, objective)
    if task.type == "snli_ve":
        template = task.prompt or DEFAULT_ENTAILMENT_PROMPT
        labels = list(DEFAULT_LABEL_WORDS)
        words = [DEFAULT_LABEL_WORDS[label] for label in labels]

        def predict_entailment(model, dataset, indices=None):
            def go():
                out = []
                for items in batches(dataset, indices):
                    prompts = [format_prompt(template, hypothesis=clean_hypothesis(it["hypothesis"])) for it in items]
                    picks = chat_rank(model, chat, items, prompts, words, len(words))
                    out.extend({"pair_id": it["pair_id"], "label": labels[c]} for it, c in zip(items, picks))
                return out
            return run(model, go)

        collate = ChatTaskCollator(chat, lambda items: entailment_examples(items, template, DEFAULT_LABEL_WORDS))
        return TaskBinding(train, evaluation, test, collate, objective, predict_entailment, _entailment_score,
                           "accuracy")
    prompt = DEFAULT_CAPTION_PROMPT if task.prompt is None else task.prompt

    def predict_captions(model, dataset, indices=None):
        def go():
            out = []
            for items in batches(dataset, indices):
                texts = chat_generate(model, chat, prompt_records(items, [prompt.strip()] * len(items)), **generation)
                out.extend({"image_id": it["image_id"], "caption": t} for it, t in zip(items, texts))
            return out
        return run(model, go)

    use_java = {"auto": None, "yes": True, "no": False}[config.eval.java]
    collate = ChatTaskCollator(chat, lambda items: caption_examples(items, prompt))
    return TaskBinding(train, evaluation, test, collate, objective, predict_captions, lambda records, dataset: _caption_score(records, dataset, use_java), "CIDEr")


def _bind_nlvr2(config: TrainConfig, chat: Any, datasets: tuple[Any, Any, Any], batches: Any, run: Any,
                objective: Any) -> Any:
    """NLVR2 on a chat model: both images of the pair in one user turn (left, then right), the sentence in
    ``task.prompt`` (``{sentence}``), target ``True`` / ``False``; inference ranks the two words as the assistant
    turn. Metrics: ``accuracy`` and ``consistency`` (official NLVR2 script)."""
    template = config.task.prompt or DEFAULT_NLVR2_PROMPT
    labels = list(DEFAULT_NLVR2_WORDS)
    words = [DEFAULT_NLVR2_WORDS[label] for label in labels]

    def predict(model, dataset, indices=None):
        def go():
            out = []
            for items in batches(dataset, indices):
                prompts = [format_prompt(template, sentence=it["sentence"].strip()) for it in items]
                picks = chat_rank(model, chat, items, prompts, words, len(words))
                out.extend({"identifier": it["identifier"], "label": labels[c]} for it, c in zip(items, picks))
            return out
        return run(model, go)

    train, evaluation, test = datasets
    collate = ChatTaskCollator(chat, lambda items: nlvr2_examples(items, template, DEFAULT_NLVR2_WORDS))
    return TaskBinding(train, evaluation, test, collate, objective, predict, _nlvr2_score, "accuracy")
