"""Bind a :class:`~vlpeft.training.config.TaskConfig` to datasets, a collator, a training objective, inference and
a metric.

There is one text layout per model family, :class:`vlpeft.tasks.sequence_encoder.SequenceEncoder` (reading the
family's :class:`vlpeft.tasks.layouts.InputLayout`): the training collator owns it and inference uses the same
object as its prompt encoder, so ranking and generation see exactly the prefix the model was trained on. Each
(framing, task) pair below is one small ``_bind_*`` function. Which families go where is read off the layouts:

=================  ==========================================  =====================================================
framing            families (layout)                           tasks (inference)
=================  ==========================================  =====================================================
generative         target after the prompt in ``input_ids``    vqa (rank, generate), snli_ve (rank), caption
                   (``ranks_candidates``): blip_caption, git,  (generate)
                   blip2, llava, paligemma, vit_gpt2
generative         prompt inference without ranking:           vqa (generate; with ``model_computes_loss`` the
                   blip_vqa                                    model computes its own loss)
discriminative     ``classifier``: vit_roberta, vit_bert       vqa (classify: BCE on soft scores over the answer
                                                               vocabulary), snli_ve (classify: 3-way CE)
=================  ==========================================  =====================================================
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlpeft.tasks.layouts import LAYOUTS, families_where
from vlpeft.training.config import ConfigError, TrainConfig

__all__ = [
    "AnswerCoverage",
    "MAX_UNANSWERABLE_TRAIN_SHARE",
    "TaskBinding",
    "answer_coverage",
    "build_task",
    "check_answer_coverage",
    "default_metric",
    "DEFAULT_METRICS",
    "VQA_LIKE_TASKS",
    "CLASSIFIER_FAMILIES",
    "RANKING_FAMILIES",
    "GENERATIVE_TRAINING_FAMILIES",
    "allowed_inference",
    "default_framing",
    "num_labels_for",
    "tokenizer_texts",
]

# Main metric per task (higher is better for all).
DEFAULT_METRICS = {"vqa": "vqa_accuracy", "snli_ve": "accuracy", "caption": "CIDEr", "chat": "loss", "gqa": "accuracy",
                   "nlvr2": "accuracy", "multitask": "multitask_average"}
#: Tasks whose items are VQA-like (question, answers): they share the VQA collators, prompts and inference.
VQA_LIKE_TASKS = ("vqa", "gqa")
#: Selection metrics where lower is better (all others: higher is better).
LOWER_IS_BETTER = frozenset({"loss"})
CAPTION_EVAL_METRICS = ("Bleu", "ROUGE_L", "CIDEr")
# Family lists read off the layouts (vlpeft.tasks.layouts); kept for the messages that list allowed families.
#: Families with a classifier head (discriminative framing).
CLASSIFIER_FAMILIES: tuple[str, ...] = families_where(lambda layout: layout.classifier)
#: Families that score candidates as ``prompt + target`` (ranking inference).
RANKING_FAMILIES: tuple[str, ...] = families_where(lambda layout: layout.ranks_candidates)
#: Families trained with the generative framing (the ranking ones first).
GENERATIVE_TRAINING_FAMILIES: tuple[str, ...] = (
    *RANKING_FAMILIES,
    *families_where(lambda layout: layout.trains_generatively and not layout.ranks_candidates),
)


def default_metric(task_type: str) -> str:
    return DEFAULT_METRICS[task_type]


def default_framing(family: str) -> str:
    """``"discriminative"`` for a family with a classifier head, else ``"generative"``."""
    layout = LAYOUTS.get(family)
    return "discriminative" if layout is not None and layout.classifier else "generative"


def allowed_inference(task_type: str, framing: str, family: str) -> tuple[str, ...]:
    """Inference modes for (task, framing, family), the default first."""
    if framing == "discriminative":
        return ("classify",) if task_type in (*VQA_LIKE_TASKS, "snli_ve") else ()
    if task_type in ("caption", "chat"):
        return ("generate",)
    layout = LAYOUTS.get(family)
    ranking = layout is not None and layout.ranks_candidates
    if task_type == "vqa":
        return ("rank", "generate") if ranking else ("generate",)
    if task_type == "gqa":  # VL-T5 / VL-Adapter generate GQA answers
        return ("generate", "rank") if ranking else ("generate",)
    if task_type == "nlvr2":  # two images per sample: chat-template models only (True/False ranked)
        return ("rank",) if layout is not None and layout.sequence == "chat_template" else ()
    return ("rank",) if ranking else ()


def num_labels_for(config: TrainConfig, answers: list[str] | None) -> int | None:
    """Classifier width of the discriminative framing (answer vocabulary size or 3), else ``None``."""
    if config.task.framing != "discriminative":
        return None
    if config.task.type == "snli_ve":
        return 3
    if not answers:
        raise ConfigError("task.answer_list: the VQA classifier needs an answer vocabulary (answer_list or train)")
    return len(answers)


@dataclass
class TaskBinding:
    """Everything the trainer needs for one task.

    Attributes:
        train_dataset / eval_dataset / test_dataset: datasets (eval/test as evaluated: image-level for captions).
        collate: list of dataset items -> model inputs with labels (a :mod:`vlpeft.tasks.collators` collator).
        objective: the training loss (:class:`vlpeft.tasks.losses.TrainingObjective`).
        predict: (model, dataset, indices) -> submission records.
        score: (records, dataset) -> ``{metric name: value}`` (percent for accuracies, pycocoevalcap scale for
            caption metrics).
        metric: the main metric name; encoder: the prompt encoder shared with the collator (generative framing).
    """

    train_dataset: Any
    eval_dataset: Any
    test_dataset: Any
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    objective: Any
    predict: Callable[..., list[dict[str, Any]]]
    score: Callable[[list[dict[str, Any]], Any], dict[str, float]]
    metric: str
    encoder: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


def _policy(mode: str):
    from vlpeft.tasks.bad_input import BadInputPolicy

    return BadInputPolicy(mode)


def _load_vqa(path: Path, annotations: Path | None, images: Path, policy, image_check: str = "decode") -> Any:
    from vlpeft.tasks.vqa import VQADataset

    with open(path) as handle:
        start = handle.read(4096)
    head = start.lstrip()[:64]
    if head.startswith("["):
        from vlpeft.tasks._io import read_json
        from vlpeft.tasks.vizwiz import VizWizVQADataset, is_vizwiz_vqa

        # VizWiz-VQA: records keyed by "image", scored by the VizWiz evaluation; the whole file is parsed to
        # decide only when its start could be VizWiz (a Karpathy file names "img_id" in its first record)
        if '"image"' in start and '"img_id"' not in start and is_vizwiz_vqa(read_json(path)):
            return VizWizVQADataset.from_vizwiz(path, images, policy=policy, image_check=image_check)
        return VQADataset.from_karpathy(path, images, annotations_json=annotations, policy=policy,
                                        image_check=image_check)
    return VQADataset.from_official(path, annotations, images, policy=policy, image_check=image_check)


def _load_captions(path: Path, images: Path, split: str, view: str, policy, image_check: str = "decode") -> Any:
    from vlpeft.tasks._io import read_json
    from vlpeft.tasks.captions import CaptionDataset
    from vlpeft.tasks.textcaps import is_textcaps, load_textcaps
    from vlpeft.tasks.vizwiz import is_vizwiz_captions, load_vizwiz_captions

    data = read_json(path)  # a truncated file raises BadInputError naming it
    if is_vizwiz_captions(data):
        return load_vizwiz_captions(path, images, view=view, policy=policy, image_check=image_check)
    if is_textcaps(data):
        return load_textcaps(path, images, view=view, policy=policy, image_check=image_check)
    if isinstance(data, dict) and "annotations" in data:
        return CaptionDataset.from_coco(path, images, view=view, policy=policy, image_check=image_check)
    return CaptionDataset.from_karpathy(path, images, split, view=view, policy=policy, image_check=image_check)


def _truncate(dataset: Any, limit: int) -> Any:
    if dataset is None or limit <= 0 or limit >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, range(limit))


def load_datasets(config: TrainConfig, image_check: str = "decode", policy: Any = None) -> tuple[Any, Any, Any]:
    """(train, eval, test) datasets of the task (``None`` for files not given).

    With ``image_check="decode"`` (the default) every image is decoded while the datasets are built, before any
    model is loaded: under ``task.bad_input: raise`` a corrupt image stops the run there with a
    :class:`~vlpeft.tasks.bad_input.BadInputError` naming the file and the record; under ``skip``/``warn`` the
    record is left out and counted, so the DataLoader never meets it mid-training. ``"exists"`` only checks that
    the files are there (faster; a corrupt image then fails when the DataLoader decodes it). ``policy``: a
    :class:`~vlpeft.tasks.bad_input.BadInputPolicy` to count bad records in (default: one for ``task.bad_input``).
    """
    task = config.task
    policy = _policy(task.bad_input) if policy is None else policy
    if task.type == "multitask":
        from vlpeft.training.multitask import load_multitask_datasets

        return load_multitask_datasets(config, image_check, policy)
    if task.type == "chat":
        from vlpeft.training.chat_binding import load_chat_datasets

        train, evaluation, test = load_chat_datasets(config, policy, image_check=image_check)
        return (_truncate(train, task.max_train_samples), _truncate(evaluation, task.max_eval_samples),
                _truncate(test, task.max_eval_samples))
    images = config.resolve_path(task.images)
    out = []
    for split in ("train", "eval", "test"):
        path = config.resolve_path(getattr(task, split))
        if path is None:
            out.append(None)
            continue
        if task.type == "vqa":
            ann = config.resolve_path(getattr(task, f"{split}_annotations"))
            out.append(_load_vqa(path, ann, images, policy, image_check))
        elif task.type == "snli_ve":
            from vlpeft.tasks.snli_ve import SNLIVEDataset

            out.append(SNLIVEDataset.from_jsonl(path, images, policy=policy, image_check=image_check))
        elif task.type == "gqa":
            from vlpeft.tasks.gqa import GQADataset

            out.append(GQADataset.from_balanced(path, images, policy=policy, image_check=image_check))
        elif task.type == "nlvr2":
            from vlpeft.tasks.nlvr2 import NLVR2Dataset

            out.append(NLVR2Dataset.from_jsonl(path, images, policy=policy, image_check=image_check))
        else:
            karpathy_split = {"train": "train", "eval": "val", "test": "test"}[split]
            view = "pairs" if split == "train" else "images"
            out.append(_load_captions(path, images, karpathy_split, view, policy, image_check))
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
        if hasattr(dataset, "parts"):  # a multi-task split: the sub-tasks' datasets
            texts.extend(tokenizer_texts(dataset.parts, limit))
            continue
        base = _items(dataset)
        for record in getattr(base, "records", [])[:limit]:
            for name in ("question", "hypothesis", "premise", "sentence"):
                value = getattr(record, name, None)
                if value:
                    texts.append(value)
            texts.extend(getattr(record, "answers", ()) or ())
            texts.extend(getattr(record, "answer_scores", {}) or {})
        for image in getattr(base, "images", [])[:limit]:
            texts.extend(image.references)
    return texts


def answer_list(config: TrainConfig, train: Any) -> list[str] | None:
    """VQA candidate answers / classifier vocabulary: ``task.answer_list`` (JSON list, or an ``ans2label`` dict),
    else built from the training records (most frequent first), else ``None``."""
    path = config.resolve_path(config.task.answer_list)
    if path is not None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"task.answer_list: {str(path)!r} is not valid JSON ({error}); expected a JSON list of "
                              "answer strings or an ans2label mapping") from error
        if isinstance(data, dict):
            data = sorted(data, key=data.get) if all(isinstance(v, int) for v in data.values()) else list(data)
        if not isinstance(data, list) or not all(isinstance(a, str) for a in data) or not data:
            raise ConfigError(f"task.answer_list: {path} must hold a non-empty JSON list of answer strings")
        return data
    if train is None:
        return None
    from vlpeft.tasks.vqa import AnswerVocab

    return list(AnswerVocab.build(_items(train).records).label2ans)


#: Largest share of training questions the VQA classifier (discriminative framing) may train on all-zero targets,
#: i.e. questions none of whose answers is in ``task.answer_list``; more is refused with a ConfigError.
MAX_UNANSWERABLE_TRAIN_SHARE = 0.10


def _gold_answers(record: Any) -> set[str]:
    """A VQA record's answers as scored (the soft-score keys, else the raw answers); empty for test questions."""
    return set(getattr(record, "answer_scores", None) or ()) or set(getattr(record, "answers", None) or ())


def _unanswerable_count(records: Sequence[Any], candidates: set[str]) -> tuple[int, int]:
    """(questions with answers none of which is a candidate, questions with answers)."""
    golds = [gold for gold in map(_gold_answers, records) if gold]
    return sum(1 for gold in golds if not gold & candidates), len(golds)


def _records_of(dataset: Any) -> list[Any]:
    """A dataset's records, only the kept ones for a truncated (``Subset``) dataset."""
    if isinstance(dataset, torch.utils.data.Subset):
        records = dataset.dataset.records
        return [records[i] for i in dataset.indices]
    return list(getattr(dataset, "records", []))


@dataclass
class AnswerCoverage:
    """How many questions of each split have none of their answers among the candidate answers.

    Attributes:
        num_answers: size of the candidate list / classifier vocabulary.
        splits: ``{split: (unanswerable, questions with answers)}`` for the splits that were counted.
        source: where the list came from (``task.answer_list`` path, or the training answers).
    """

    num_answers: int
    splits: dict[str, tuple[int, int]]
    source: str

    def share(self, split: str) -> float:
        missing, total = self.splits.get(split, (0, 0))
        return missing / total if total else 0.0

    def line(self) -> str:
        """One line with the counts per split."""
        parts = [f"{split} {missing} of {total} ({100.0 * self.share(split):.1f}%)"
                 for split, (missing, total) in self.splits.items()]
        return (f"answer list ({self.num_answers} answers, {self.source}): questions with none of their answers in "
                f"it: {', '.join(parts) if parts else 'none counted'}")


def answer_coverage(config: TrainConfig, datasets: Sequence[Any], answers: Sequence[str],
                    splits: Sequence[str] = ("train", "eval", "test")) -> AnswerCoverage:
    """Count, per split in ``splits``, the questions with answers none of which is in ``answers``."""
    candidates = set(answers)
    counted = {}
    for split, dataset in zip(("train", "eval", "test"), datasets, strict=True):
        if dataset is None or split not in splits:
            continue
        missing, total = _unanswerable_count(_records_of(dataset), candidates)
        if total:
            counted[split] = (missing, total)
    path = config.resolve_path(config.task.answer_list)
    return AnswerCoverage(len(candidates), counted, f"task.answer_list {str(path)!r}" if path is not None
                          else "built from the training answers")


def check_answer_coverage(config: TrainConfig, datasets: Sequence[Any], answers: Sequence[str] | None, *,
                          training: bool = True) -> AnswerCoverage | None:
    """Count the VQA questions that the candidate list cannot answer (``None`` for other tasks).

    For the classifier (discriminative framing) such a training question trains on an all-zero target; when
    ``training`` and more than :data:`MAX_UNANSWERABLE_TRAIN_SHARE` of the training questions are such, this
    raises :class:`ConfigError` naming ``task.answer_list``. Ranking and classification cannot answer them either:
    evaluation reports them as ``unanswerable``.
    """
    if config.task.type != "vqa" or not answers:
        return None
    splits = ("train", "eval", "test") if training else ("eval", "test")
    coverage = answer_coverage(config, datasets, answers, splits)
    if training and config.task.framing == "discriminative":
        missing, total = coverage.splits.get("train", (0, 0))
        if total and missing / total > MAX_UNANSWERABLE_TRAIN_SHARE:
            raise ConfigError(
                f"task.answer_list: {missing} of {total} training questions ({100.0 * missing / total:.1f}%) have "
                f"none of their answers among the {coverage.num_answers} answers of {coverage.source}, so the VQA "
                f"classifier would train them on all-zero targets; at most {100 * MAX_UNANSWERABLE_TRAIN_SHARE:.0f}% "
                "is allowed (MAX_UNANSWERABLE_TRAIN_SHARE in vlpeft.training.task_binding). Add the missing answers "
                "to the list, or leave task.answer_list unset to build the vocabulary from the training answers"
            )
    return coverage


def _vqa_score(records: list[dict[str, Any]], dataset: Any,
               candidates: Sequence[str] | None = None) -> dict[str, float]:
    """VQA accuracy of ``records``; with ``candidates`` (the answers ranking / the classifier can pick from), also
    ``unanswerable``: how many of the scored questions have none of their answers among them."""
    scores = _vqa_accuracy(records, dataset)
    if candidates is not None:
        by_id = {r.question_id: r for r in _items(dataset).records}
        scored = [by_id[p["question_id"]] for p in records]
        scores["unanswerable"] = float(_unanswerable_count(scored, set(candidates))[0])
    return scores


def _vqa_accuracy(records: list[dict[str, Any]], dataset: Any) -> dict[str, float]:
    from vlpeft.metrics import vqa_accuracy, vqa_label_accuracy

    by_id = {r.question_id: r for r in _items(dataset).records}
    predicted = {p["question_id"]: p["answer"] for p in records}
    if getattr(_items(dataset), "official_metric", None) == "vizwiz":
        return _vizwiz_accuracy(predicted, [by_id[q] for q in predicted])
    with_answers = [by_id[q] for q in predicted if by_id[q].answers]
    if len(with_answers) == len(predicted):
        annotations = [{"question_id": r.question_id, "answers": list(r.answers),
                        "answer_type": r.answer_type, "question_type": r.question_type} for r in with_answers]
        return {"vqa_accuracy": vqa_accuracy(predicted, annotations).overall}
    labels = {q: by_id[q].answer_scores for q in predicted}
    return {"vqa_accuracy": vqa_label_accuracy(predicted, labels)}


def _gqa_score(records: list[dict[str, Any]], dataset: Any) -> dict[str, float]:
    """GQA exact-match accuracy: ``accuracy`` after the VQA answer normalisation of both sides, ``accuracy_strict``
    as the official ``eval.py`` (raw strings), and per structural type (:mod:`vlpeft.metrics.exact_match`)."""
    from vlpeft.metrics.exact_match import gqa_accuracy

    by_id = {r.question_id: r for r in _items(dataset).records}
    predicted = {p["question_id"]: p["answer"] for p in records if by_id[p["question_id"]].answer is not None}
    if not predicted:
        return {}
    gold = {q: by_id[q].answer for q in predicted}
    types = {q: by_id[q].structural_type for q in predicted if by_id[q].structural_type}
    score = gqa_accuracy(predicted, gold, groups=types)
    out = {"accuracy": score.overall, "accuracy_strict": gqa_accuracy(predicted, gold, normalize=False).overall}
    out.update({f"accuracy_{group}": value for group, value in score.per_group.items()})
    return out


def _nlvr2_score(records: list[dict[str, Any]], dataset: Any) -> dict[str, float]:
    """NLVR2 ``accuracy`` and ``consistency`` (:mod:`vlpeft.metrics.nlvr2`, as the official eval script)."""
    from vlpeft.metrics.nlvr2 import nlvr2_scores

    gold = {r.identifier: r.label for r in _items(dataset).records}
    predicted = {p["identifier"]: p["label"] for p in records}
    score = nlvr2_scores(predicted, {k: gold[k] for k in predicted})
    return {"accuracy": score.accuracy, "consistency": score.consistency}


def _vizwiz_accuracy(predicted: dict[Any, str], records: list[Any]) -> dict[str, float]:
    """VizWiz-VQA data: the official VizWiz evaluation (:mod:`vlpeft.metrics.vizwiz`) under the VQA metric name
    ``vqa_accuracy`` (the selection metric of ``task.type: vqa``) and as ``vizwiz_accuracy``, plus
    ``vizwiz_accuracy_<answer type>``. Questions without answers (the test split) are not scored."""
    from vlpeft.metrics.vizwiz import vizwiz_accuracy

    records = [r for r in records if r.answers]
    if not records:
        return {}
    score = vizwiz_accuracy({r.question_id: predicted[r.question_id] for r in records},
                            [{"image": r.question_id, "answers": list(r.answers), "answer_type": r.answer_type}
                             for r in records])
    out = {"vqa_accuracy": score.overall, "vizwiz_accuracy": score.overall}
    out.update({f"vizwiz_accuracy_{k.replace('/', '_')}": v for k, v in score.per_answer_type.items()})
    return out


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


def _generation_kwargs(config: TrainConfig) -> dict[str, Any]:
    ev = config.eval
    return {"num_beams": ev.num_beams, "max_new_tokens": ev.max_new_tokens, "min_new_tokens": ev.min_new_tokens}


def _token_objective(config: TrainConfig, encoder: Any) -> Any:
    from vlpeft.tasks.losses import ModelLossObjective, TokenObjective

    if encoder.layout.model_computes_loss:
        return ModelLossObjective()
    return TokenObjective(config.optim.label_smoothing, encoder.prefix_predicts_first_token)


def _bind_generative(config: TrainConfig, processor: Any, family: str, model_config: Any,
                     datasets: tuple[Any, Any, Any], answers: list[str] | None) -> TaskBinding:
    from vlpeft.tasks import collators, inference
    from vlpeft.tasks.framing import DEFAULT_CAPTION_PROMPT, DEFAULT_ENTAILMENT_PROMPT, DEFAULT_VQA_PROMPT
    from vlpeft.tasks.losses import WeightedSequenceObjective

    task = config.task
    mode = task.inference or allowed_inference(task.type, task.framing, family)[0]
    batch_size = config.optim.eval_batch_size or config.optim.batch_size
    common = {"max_length": task.max_length, "model_config": model_config}
    train, evaluation, test = datasets
    if task.type in VQA_LIKE_TASKS:
        template = task.prompt or DEFAULT_VQA_PROMPT
        collate = collators.VQAGenerativeCollator(processor, family, answer_weighting=task.answer_weighting,
                                                  prompt_template=template, **common)
        encoder = collate.encoder
        if task.answer_weighting == "most_common" or encoder.layout.model_computes_loss:
            objective = _token_objective(config, encoder)
        else:
            objective = WeightedSequenceObjective(config.optim.label_smoothing)

        def predict(model, dataset, indices=None):
            return inference.predict_vqa(model, dataset, mode=mode, prompt_template=template, encoder=encoder,
                                         answer_list=answers, indices=indices, batch_size=batch_size,
                                         top_k=config.eval.rank_top_k, **_generation_kwargs(config))

        candidates = answers if mode == "rank" else None

        def score(records, dataset):
            return _gqa_score(records, dataset) if task.type == "gqa" else _vqa_score(records, dataset, candidates)

        return TaskBinding(train, evaluation, test, collate, objective, predict, score, DEFAULT_METRICS[task.type],
                           encoder, {"answer_list": answers})
    if task.type == "snli_ve":
        template = task.prompt or DEFAULT_ENTAILMENT_PROMPT
        collate = collators.EntailmentGenerativeCollator(processor, family, prompt_template=template, **common)
        encoder = collate.encoder

        def predict(model, dataset, indices=None):
            return inference.predict_entailment(model, dataset, mode=mode, label_words=collate.label_words,
                                                prompt_template=template, encoder=encoder, indices=indices,
                                                batch_size=batch_size)

        return TaskBinding(train, evaluation, test, collate, _token_objective(config, encoder), predict,
                           _entailment_score, "accuracy", encoder)
    prompt = DEFAULT_CAPTION_PROMPT if task.prompt is None else task.prompt
    collate = collators.CaptionGenerativeCollator(processor, family, prompt=prompt, **common)
    encoder = collate.encoder

    def predict_captions(model, dataset, indices=None):
        return inference.predict_captions(model, dataset, encoder=encoder, prompt=prompt, indices=indices,
                                          batch_size=batch_size, **_generation_kwargs(config))

    use_java = {"auto": None, "yes": True, "no": False}[config.eval.java]
    return TaskBinding(train, evaluation, test, collate, _token_objective(config, encoder), predict_captions,
                       lambda records, dataset: _caption_score(records, dataset, use_java), "CIDEr", encoder)


def _bind_discriminative(config: TrainConfig, processor: Any, datasets: tuple[Any, Any, Any],
                         answers: list[str] | None) -> TaskBinding:
    from vlpeft.tasks import collators, inference
    from vlpeft.tasks.framing import DEFAULT_VQA_PROMPT
    from vlpeft.tasks.losses import ClassificationObjective
    from vlpeft.tasks.snli_ve import SNLI_VE_LABELS
    from vlpeft.tasks.vqa import AnswerVocab

    task = config.task
    batch_size = config.optim.eval_batch_size or config.optim.batch_size
    train, evaluation, test = datasets
    if task.type in VQA_LIKE_TASKS:
        vocab = AnswerVocab(answers or [])
        collate = collators.VQAClassificationCollator(processor, vocab, max_length=task.max_length,
                                                      prompt_template=task.prompt or DEFAULT_VQA_PROMPT)
    else:
        collate = collators.EntailmentClassificationCollator(processor, max_length=task.max_length)

    def classify_inputs(items):
        return {k: v for k, v in collate(items).items() if k != "labels"}

    if task.type in VQA_LIKE_TASKS:
        def predict(model, dataset, indices=None):
            return inference.predict_vqa(model, dataset, mode="classify", answer_list=vocab.label2ans,
                                         classify_inputs=classify_inputs, indices=indices, batch_size=batch_size)

        def score(records, dataset):
            if task.type == "gqa":
                return _gqa_score(records, dataset)
            return _vqa_score(records, dataset, vocab.label2ans)

        return TaskBinding(train, evaluation, test, collate, ClassificationObjective("multi_label"), predict,
                           score, DEFAULT_METRICS[task.type], None, {"answer_list": vocab.label2ans})

    def predict_entailment(model, dataset, indices=None):
        return inference.predict_entailment(model, dataset, mode="classify",
                                            label_words={label: label for label in SNLI_VE_LABELS},
                                            classify_inputs=classify_inputs, indices=indices, batch_size=batch_size)

    return TaskBinding(train, evaluation, test, collate, ClassificationObjective("single_label"),
                       predict_entailment, _entailment_score, "accuracy")


def build_task(config: TrainConfig, processor: Any, family: str, model_config: Any,
               datasets: tuple[Any, Any, Any], answers: list[str] | None = None) -> TaskBinding:
    """Wire datasets, collation, the training objective, inference and scoring for ``config.task``.

    ``answers``: the VQA candidate list / classifier vocabulary (:func:`answer_list`). ``task.type: multitask``
    binds each sub-task with this function (:func:`vlpeft.training.multitask.build_multitask`).
    """
    if config.task.type == "multitask":
        from vlpeft.training.multitask import build_multitask

        return build_multitask(config, processor, family, model_config, datasets)
    if config.task.framing == "discriminative":
        return _bind_discriminative(config, processor, datasets, answers)
    if LAYOUTS[family].sequence == "chat_template":
        from vlpeft.training.chat_binding import bind_chat_template

        return bind_chat_template(config, processor, datasets, answers)
    return _bind_generative(config, processor, family, model_config, datasets, answers)
