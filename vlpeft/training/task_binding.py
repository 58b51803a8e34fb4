"""Bind a :class:`~vlpeft.training.config.TaskConfig` to datasets, a training collator, inference and a metric.

The generative framing (p-adapter.md §4) lays out every training sequence as ``prompt ids + target ids``, with
the loss on the target only. :class:`ProcessorTextIO` implements that layout for processor-based families and
is also the :class:`~vlpeft.tasks.inference.PromptEncoder` used at inference, so ranking/generation see exactly
the prefix the model was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlpeft.training.config import ConfigError, TrainConfig

__all__ = ["ProcessorTextIO", "TaskBinding", "build_task", "default_metric", "DEFAULT_METRICS", "tokenizer_texts"]

# Main metric per task, and whether higher is better (all are).
DEFAULT_METRICS = {"vqa": "vqa_accuracy", "snli_ve": "accuracy", "caption": "CIDEr"}
CAPTION_EVAL_METRICS = ("Bleu", "ROUGE_L", "CIDEr")
# Families whose processor inserts the image placeholder tokens in the text.
IMAGE_TOKEN_FAMILIES = ("blip2", "llava")
BOS_REPLACING_FAMILIES = ("blip_caption",)


def default_metric(task_type: str) -> str:
    return DEFAULT_METRICS[task_type]


class ProcessorTextIO:
    """Prompt/target encoding for a family with a transformers processor (generative framing).

    - BLIP caption decoder: prompt ids = ``[bos] + words`` (BLIP replaces ``[CLS]`` by its decoder bos, as
      ``generate`` does), target = ``words + [sep]``; ``generate`` drops the last input id, so generation ids
      are ``prompt + [sep]``.
    - LLaVA / BLIP-2: the processor expands the image placeholder; prompt ids = processor ids, target =
      ``words + [eos]``.

    Args:
        processor: the model's processor (``.tokenizer`` and image processing through ``__call__``).
        family: model family name.
        model_config: the model's config (special-token ids).
        max_length: maximum total sequence length (prompt + target); longer targets are truncated.
    """

    def __init__(self, processor: Any, family: str, model_config: Any, max_length: int) -> None:
        if family not in BOS_REPLACING_FAMILIES + IMAGE_TOKEN_FAMILIES:
            raise ConfigError(
                f"the generative framing supports model families {list(BOS_REPLACING_FAMILIES + IMAGE_TOKEN_FAMILIES)}, "
                f"got {family!r}"
            )
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family
        self.max_length = max_length
        text_config = getattr(model_config, "text_config", model_config)
        if family in BOS_REPLACING_FAMILIES:
            self.bos_id = text_config.bos_token_id
            self.end_id = text_config.sep_token_id
        else:
            self.bos_id = None
            self.end_id = self.tokenizer.eos_token_id
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def pad_token_id(self) -> int:
        return self._pad

    def _prompt_text(self, prompt: str) -> str:
        if self.family in IMAGE_TOKEN_FAMILIES:
            token = getattr(self.processor, "image_token", None) or "<image>"
            if token not in prompt:
                return f"{token} {prompt}".strip()
        return prompt

    def encode_prompts(self, items: Sequence[Mapping[str, Any]], prompts: Sequence[str]):
        images = [item["image"] for item in items]
        batch = self.processor(images=images, text=[self._prompt_text(p) for p in prompts], padding=True,
                               return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        prompt_ids = []
        for row, m in zip(ids.tolist(), mask.tolist()):
            tokens = [t for t, keep in zip(row, m) if keep]
            if self.family in BOS_REPLACING_FAMILIES:
                tokens = [self.bos_id] + tokens[1:-1]  # [CLS] words [SEP] -> [bos] words
            prompt_ids.append(tokens)
        extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
        return extra, prompt_ids

    def encode_target(self, text: str) -> list[int]:
        words = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(words) + [self.end_id]

    def generation_ids(self, prompt_ids: list[int]) -> list[int]:
        if self.family in BOS_REPLACING_FAMILIES:
            return prompt_ids + [self.end_id]
        return prompt_ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def collate(self, items: Sequence[Mapping[str, Any]], prompts: Sequence[str], targets: Sequence[str]):
        """Training batch: ``input_ids``/``attention_mask``/``labels`` (batch, length) right-padded, loss on the
        target tokens only, plus the processor's image inputs (``pixel_values`` (batch, 3, H, W))."""
        extra, prompt_ids = self.encode_prompts(items, prompts)
        rows, label_rows = [], []
        for p, t in zip(prompt_ids, targets):
            target = self.encode_target(t)
            seq = (p + target)[: self.max_length]
            rows.append(seq)
            label_rows.append(([-100] * len(p) + target)[: self.max_length])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (r, lab) in enumerate(zip(rows, label_rows)):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
            labels[i, : len(lab)] = torch.tensor(lab)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, **extra}


@dataclass
class TaskBinding:
    """Everything the trainer needs for one task.

    Attributes:
        train_dataset / eval_dataset / test_dataset: datasets (eval/test as evaluated: image-level for captions).
        collate: list of dataset items -> model inputs with labels.
        predict: (model, dataset, indices) -> submission records.
        score: (records, dataset) -> ``{metric name: value}`` (percent for accuracies, pycocoevalcap scale for
            caption metrics).
        metric: the main metric name; text_io: the prompt encoder.
    """

    train_dataset: Any
    eval_dataset: Any
    test_dataset: Any
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    predict: Callable[..., list[dict[str, Any]]]
    score: Callable[[list[dict[str, Any]], Any], dict[str, float]]
    metric: str
    text_io: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


def _policy(mode: str):
    from vlpeft.tasks.bad_input import BadInputPolicy

    return BadInputPolicy(mode)


def _load_vqa(path: Path, annotations: Path | None, images: Path, policy) -> Any:
    from vlpeft.tasks.vqa import VQADataset

    with open(path) as handle:
        head = handle.read(64).lstrip()
    if head.startswith("["):
        return VQADataset.from_karpathy(path, images, annotations_json=annotations, policy=policy)
    return VQADataset.from_official(path, annotations, images, policy=policy)


def _load_captions(path: Path, images: Path, split: str, view: str, policy) -> Any:
    from vlpeft.tasks.captions import CaptionDataset

    data = json.loads(path.read_text())
    if isinstance(data, dict) and "annotations" in data:
        return CaptionDataset.from_coco(path, images, view=view, policy=policy)
    return CaptionDataset.from_karpathy(path, images, split, view=view, policy=policy)


def _truncate(dataset: Any, limit: int) -> Any:
    if dataset is None or limit <= 0 or limit >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, range(limit))


def load_datasets(config: TrainConfig) -> tuple[Any, Any, Any]:
    """(train, eval, test) datasets of the task (``None`` for files not given)."""
    task = config.task
    images = config.resolve_path(task.images)
    policy = _policy(task.bad_input)
    out = []
    for split in ("train", "eval", "test"):
        path = config.resolve_path(getattr(task, split))
        if path is None:
            out.append(None)
            continue
        if task.type == "vqa":
            ann = config.resolve_path(getattr(task, f"{split}_annotations"))
            out.append(_load_vqa(path, ann, images, policy))
        elif task.type == "snli_ve":
            from vlpeft.tasks.snli_ve import SNLIVEDataset

            out.append(SNLIVEDataset.from_jsonl(path, images, policy=policy))
        else:
            karpathy_split = {"train": "train", "eval": "val", "test": "test"}[split]
            view = "pairs" if split == "train" else "images"
            out.append(_load_captions(path, images, karpathy_split, view, policy))
    train, evaluation, test = out
    return (_truncate(train, task.max_train_samples), _truncate(evaluation, task.max_eval_samples),
            _truncate(test, task.max_eval_samples))


def _items(dataset: Any) -> Any:
    return dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset


def tokenizer_texts(datasets: Sequence[Any], limit: int = 2000) -> list[str]:
    """Texts (questions, answers, hypotheses, captions) of the datasets' records, to build a tiny tokenizer
    without loading images."""
    texts: list[str] = []
    for dataset in datasets:
        if dataset is None:
            continue
        base = _items(dataset)
        for record in getattr(base, "records", [])[:limit]:
            for name in ("question", "hypothesis", "premise"):
                value = getattr(record, name, None)
                if value:
                    texts.append(value)
            texts.extend(getattr(record, "answers", ()) or ())
            texts.extend(getattr(record, "answer_scores", {}) or {})
        for image in getattr(base, "images", [])[:limit]:
            texts.extend(image.references)
    return texts


def _answer_list(config: TrainConfig, train: Any) -> list[str] | None:
    path = config.resolve_path(config.task.answer_list)
    if path is not None:
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            data = list(data)
        if not isinstance(data, list) or not all(isinstance(a, str) for a in data) or not data:
            raise ConfigError(f"task.answer_list: {path} must hold a non-empty JSON list of answer strings")
        return data
    if train is None:
        return None
    from vlpeft.tasks.vqa import AnswerVocab

    return list(AnswerVocab.build(_items(train).records).label2ans)


def _vqa_score(records: list[dict[str, Any]], dataset: Any) -> dict[str, float]:
    from vlpeft.metrics import vqa_accuracy, vqa_label_accuracy

    by_id = {r.question_id: r for r in _items(dataset).records}
    predicted = {p["question_id"]: p["answer"] for p in records}
    with_answers = [by_id[q] for q in predicted if by_id[q].answers]
    if len(with_answers) == len(predicted):
        annotations = [{"question_id": r.question_id, "answers": list(r.answers),
                        "answer_type": r.answer_type, "question_type": r.question_type} for r in with_answers]
        return {"vqa_accuracy": vqa_accuracy(predicted, annotations).overall}
    labels = {q: by_id[q].answer_scores for q in predicted}
    return {"vqa_accuracy": vqa_label_accuracy(predicted, labels)}


def _entailment_score(records: list[dict[str, Any]], dataset: Any) -> dict[str, float]:
    from vlpeft.metrics import entailment_accuracy

    gold = {r.pair_id: r.label for r in _items(dataset).records}
    predicted = {p["pair_id"]: p["label"] for p in records}
    score = entailment_accuracy(predicted, {k: gold[k] for k in predicted})
    out = {"accuracy": score.overall}
    out.update({f"accuracy_{k}": v for k, v in score.per_class.items() if v is not None})
    return out


def _caption_score(records: list[dict[str, Any]], dataset: Any, use_java: bool | None) -> dict[str, float]:
    from vlpeft.metrics import caption_scores

    references = _items(dataset).references()
    predicted = {p["image_id"]: p["caption"] for p in records}
    scores = caption_scores(predicted, {k: references[k] for k in predicted}, use_java=use_java,
                            metrics=CAPTION_EVAL_METRICS)
    out = {k: float(v) for k, v in scores.scores.items() if v is not None}
    if "CIDEr" in out and "Bleu_4" in out:
        out["CIDEr+Bleu_4"] = out["CIDEr"] + out["Bleu_4"]
    return out


def build_task(config: TrainConfig, processor: Any, family: str, model_config: Any,
               datasets: tuple[Any, Any, Any]) -> TaskBinding:
    """Wire datasets, collation, inference and scoring for ``config.task`` (generative framing)."""
    from vlpeft.tasks import inference
    from vlpeft.tasks.framing import (
        DEFAULT_CAPTION_PROMPT,
        DEFAULT_ENTAILMENT_PROMPT,
        DEFAULT_LABEL_WORDS,
        clean_hypothesis,
        vqa_targets,
    )

    task = config.task
    if task.framing != "generative":
        raise ConfigError("task.framing: only 'generative' is wired into the trainer in this version")
    train, evaluation, test = datasets
    text_io = ProcessorTextIO(processor, family, model_config, task.max_length)
    gen_kwargs = {"num_beams": config.eval.num_beams, "max_new_tokens": config.eval.max_new_tokens,
                  "min_new_tokens": config.eval.min_new_tokens}
    batch_size = config.optim.eval_batch_size or config.optim.batch_size

    if task.type == "vqa":
        template = task.prompt or "{question}"
        mode = task.inference or "rank"
        answers = _answer_list(config, train) if mode == "rank" else None

        def collate(items):
            targets = [vqa_targets(it, "most_common")[0][0] for it in items]
            return text_io.collate(items, [template.format(**it) for it in items], targets)

        def predict(model, dataset, indices=None):
            return inference.predict_vqa(model, dataset, mode=mode, prompt_template=template, encoder=text_io,
                                         answer_list=answers, indices=indices, batch_size=batch_size,
                                         top_k=config.eval.rank_top_k, **gen_kwargs)

        return TaskBinding(train, evaluation, test, collate, predict, _vqa_score, "vqa_accuracy", text_io,
                           {"answer_list": answers})

    if task.type == "snli_ve":
        template = task.prompt or DEFAULT_ENTAILMENT_PROMPT
        words = dict(DEFAULT_LABEL_WORDS)

        def collate(items):
            prompts = [template.format(**{**it, "hypothesis": clean_hypothesis(it["hypothesis"])}) for it in items]
            return text_io.collate(items, prompts, [words[it["label"]] for it in items])

        def predict(model, dataset, indices=None):
            return inference.predict_entailment(model, dataset, mode=task.inference or "rank", label_words=words,
                                                prompt_template=template, encoder=text_io, indices=indices,
                                                batch_size=batch_size)

        return TaskBinding(train, evaluation, test, collate, predict, _entailment_score, "accuracy", text_io)

    prompt = DEFAULT_CAPTION_PROMPT if task.prompt is None else task.prompt

    def collate(items):
        return text_io.collate(items, [prompt] * len(items), [it["caption"] for it in items])

    def predict(model, dataset, indices=None):
        return inference.predict_captions(model, dataset, encoder=text_io, prompt=prompt, indices=indices,
                                          batch_size=batch_size, **gen_kwargs)

    use_java = {"auto": None, "yes": True, "no": False}[config.eval.java]
    return TaskBinding(train, evaluation, test, collate, predict,
                       lambda records, dataset: _caption_score(records, dataset, use_java), "CIDEr", text_io)
