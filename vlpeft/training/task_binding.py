"""Bind a :class:`~vlpeft.training.config.TaskConfig` to datasets, a collator, a training objective, inference and
a metric.

There is one text layout per model family, :class:`vlpeft.tasks.sequence_encoder.SequenceEncoder` (reading the
family's :class:`vlpeft.tasks.layouts.InputLayout`): the training collator owns it and inference uses the same
object as its prompt encoder, so ranking and generation see exactly the prefix the model was trained on. Each
(framing, task) pair below is one small ``_bind_*`` function. Which families go where is read off the layouts:

=================  ==========================================  =====================================================
framing            families (layout)                           tasks (inference)
=================  ==========================================  =====================================================
generative         target after the prompt in ``input_ids``    vqa (rank, generate), gqa (generate, rank),
                   (``ranks_candidates``): blip_caption, git,  snli_ve (rank), caption (generate), nlvr2 (rank,
                   blip2, llava, paligemma, vit_gpt2           generate; blip_caption and blip2 only)
generative         prompt inference without ranking:           vqa, gqa, caption, nlvr2 (generate; with
                   blip_vqa, clip_bart                         ``model_computes_loss`` (blip_vqa) the model
                                                               computes its own loss); snli_ve (generate the
                                                               label word; ``seq2seq``: clip_bart only)
generative         ``chat_template`` (:mod:`.chat_binding`)    vqa, gqa (generate, rank), snli_ve, nlvr2 (rank),
                                                               caption (generate), chat
discriminative     ``classifier``: vit_roberta, vit_bert       vqa, gqa (classify: BCE on soft scores over the
                                                               answer vocabulary), snli_ve (classify: 3-way CE)
=================  ==========================================  =====================================================

NLVR2's two images per sample reach only the families whose layout has ``two_images``
(:mod:`vlpeft.training.image_pairs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlpeft.tasks import collators, inference
from vlpeft.tasks._io import read_json
from vlpeft.tasks.bad_input import BadInputPolicy
from vlpeft.tasks.captions import CaptionDataset
from vlpeft.tasks.framing import (
    DEFAULT_CAPTION_PROMPT,
    DEFAULT_ENTAILMENT_PROMPT,
    DEFAULT_LABEL_WORDS,
    DEFAULT_VQA_PROMPT,
    GENERATED_LABEL_WORDS,
)
from vlpeft.tasks.gqa import GQADataset
from vlpeft.tasks.layouts import LAYOUTS, families_where
from vlpeft.tasks.losses import (
    ClassificationObjective,
    ModelLossObjective,
    TokenObjective,
    WeightedSequenceObjective,
)
from vlpeft.tasks.nlvr2 import NLVR2Dataset
from vlpeft.tasks.snli_ve import SNLI_VE_LABELS, SNLIVEDataset
from vlpeft.tasks.textcaps import is_textcaps, load_textcaps
from vlpeft.tasks.vizwiz import VizWizVQADataset, is_vizwiz_captions, is_vizwiz_vqa, load_vizwiz_captions
from vlpeft.tasks.vqa import AnswerVocab, VQADataset
from vlpeft.training.answer_coverage import (  # noqa: F401  (also read from here)
    MAX_UNANSWERABLE_TRAIN_SHARE,
    AnswerCoverage,
    answer_coverage,
    answer_list,
    check_answer_coverage,
)
from vlpeft.training.config import ConfigError, TrainConfig
from vlpeft.training.task_scores import (  # noqa: F401  (the scorers are also read from here)
    CAPTION_EVAL_METRICS,
    _caption_score,
    _entailment_score,
    _gqa_score,
    _items,
    _nlvr2_score,
    _unanswerable_count,
    _vqa_score,
)

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
    "target_texts",
    "tokenizer_texts",
]

# Main metric per task (higher is better for all).
DEFAULT_METRICS = {"vqa": "vqa_accuracy", "snli_ve": "accuracy", "caption": "CIDEr", "chat": "loss", "gqa": "accuracy",
                   "nlvr2": "accuracy", "multitask": "multitask_average"}
#: Tasks whose items are VQA-like (question, answers): they share the VQA collators, prompts and inference.
VQA_LIKE_TASKS = ("vqa", "gqa")
#: Selection metrics where lower is better (all others: higher is better).
LOWER_IS_BETTER = frozenset({"loss"})
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
    if task_type == "nlvr2":  # two images per sample: families with layout.two_images only
        if layout is None or layout.two_images is None:
            return ()
        if layout.sequence == "chat_template":  # True/False ranked as the assistant turn
            return ("rank",)
        return ("rank", "generate") if ranking else ("generate",)  # VL-T5 / VL-Adapter generate true/false
    if task_type == "snli_ve" and not ranking and layout is not None and layout.sequence == "seq2seq":
        return ("generate",)  # encoder-decoder (CLIP-BART): the label word generated, as NLVR2's true/false
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
    return BadInputPolicy(mode)


def _load_vqa(path: Path, annotations: Path | None, images: Path, policy, image_check: str = "decode") -> Any:
    with open(path) as handle:
        start = handle.read(4096)
    head = start.lstrip()[:64]
    if head.startswith("["):
        # VizWiz-VQA: records keyed by "image", scored by the VizWiz evaluation; the whole file is parsed to
        # decide only when its start could be VizWiz (a Karpathy file names "img_id" in its first record)
        if '"image"' in start and '"img_id"' not in start and is_vizwiz_vqa(read_json(path)):
            return VizWizVQADataset.from_vizwiz(path, images, policy=policy, image_check=image_check)
        return VQADataset.from_karpathy(path, images, annotations_json=annotations, policy=policy,
                                        image_check=image_check)
    return VQADataset.from_official(path, annotations, images, policy=policy, image_check=image_check)


def _load_captions(path: Path, images: Path, split: str, view: str, policy, image_check: str = "decode") -> Any:
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
        # lazy: cycle (multitask imports this module)
        from vlpeft.training.multitask import load_multitask_datasets

        return load_multitask_datasets(config, image_check, policy)
    if task.type == "chat":
        # lazy: cycle (chat_binding imports this module)
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
            out.append(SNLIVEDataset.from_jsonl(path, images, policy=policy, image_check=image_check))
        elif task.type == "gqa":
            out.append(GQADataset.from_balanced(path, images, policy=policy, image_check=image_check))
        elif task.type == "nlvr2":
            out.append(NLVR2Dataset.from_jsonl(path, images, policy=policy, image_check=image_check))
        else:
            karpathy_split = {"train": "train", "eval": "val", "test": "test"}[split]
            view = "pairs" if split == "train" else "images"
            out.append(_load_captions(path, images, karpathy_split, view, policy, image_check))
    train, evaluation, test = out
    return (_truncate(train, task.max_train_samples), _truncate(evaluation, task.max_eval_samples),
            _truncate(test, task.max_eval_samples))


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


def target_texts(config: TrainConfig, family: str) -> list[str]:
    """Target words the data does not hold but generated tasks train on (so a tiny twin's tokenizer, trained on
    :func:`tokenizer_texts`, knows them): the SNLI-VE labels of a task (or multi-task sub-task) that generates them
    (``GENERATED_LABEL_WORDS``). The other label words are in the tokenizer's template texts."""
    if config.task.type == "multitask":
        # lazy: cycle (multitask imports this module)
        from vlpeft.training.multitask import subtasks

        return [text for _, sub in subtasks(config) for text in target_texts(sub, family)]
    task = config.task
    if task.type != "snli_ve":
        return []
    framing = task.framing or default_framing(family)
    modes = allowed_inference(task.type, framing, family)
    mode = task.inference or (modes[0] if modes else None)
    return list(GENERATED_LABEL_WORDS.values()) if mode == "generate" else []


def _generation_kwargs(config: TrainConfig) -> dict[str, Any]:
    ev = config.eval
    return {"num_beams": ev.num_beams, "max_new_tokens": ev.max_new_tokens, "min_new_tokens": ev.min_new_tokens}


def _token_objective(config: TrainConfig, encoder: Any) -> Any:
    if encoder.layout.model_computes_loss:
        return ModelLossObjective()
    return TokenObjective(config.optim.label_smoothing, encoder.prefix_predicts_first_token)


def _bind_generative(config: TrainConfig, processor: Any, family: str, model_config: Any,
                     datasets: tuple[Any, Any, Any], answers: list[str] | None) -> TaskBinding:
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
        generated = mode == "generate"  # the label itself is the target word (CLIP-BART)
        words = GENERATED_LABEL_WORDS if generated else DEFAULT_LABEL_WORDS
        collate = collators.EntailmentGenerativeCollator(processor, family, prompt_template=template,
                                                         label_words=words, **common)
        encoder = collate.encoder
        generation = _generation_kwargs(config) if generated else {}

        def predict(model, dataset, indices=None):
            return inference.predict_entailment(model, dataset, mode=mode, label_words=collate.label_words,
                                                prompt_template=template, encoder=encoder, indices=indices,
                                                batch_size=batch_size, **generation)

        def score_entailment(records, dataset):
            return _entailment_score(records, dataset, generated=generated)

        return TaskBinding(train, evaluation, test, collate, _token_objective(config, encoder), predict,
                           score_entailment, "accuracy", encoder)
    if task.type == "nlvr2":
        collate = collators.NLVR2GenerativeCollator(processor, family, prompt_template=task.prompt, **common)
        encoder = collate.encoder

        def predict_nlvr2(model, dataset, indices=None):
            return inference.predict_nlvr2(model, dataset, mode=mode, label_words=collate.label_words,
                                           prompt_template=collate.prompt_template, encoder=encoder,
                                           indices=indices, batch_size=batch_size, **_generation_kwargs(config))

        def score_nlvr2(records, dataset):
            return _nlvr2_score(records, dataset, generated=mode == "generate")

        return TaskBinding(train, evaluation, test, collate, _token_objective(config, encoder), predict_nlvr2,
                           score_nlvr2, "accuracy", encoder)
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
        # lazy: cycle (multitask imports this module)
        from vlpeft.training.multitask import build_multitask

        return build_multitask(config, processor, family, model_config, datasets)
    if config.task.framing == "discriminative":
        return _bind_discriminative(config, processor, datasets, answers)
    if LAYOUTS[family].sequence == "chat_template":
        # lazy: cycle (chat_binding imports this module)
        from vlpeft.training.chat_binding import bind_chat_template

        return bind_chat_template(config, processor, datasets, answers)
    return _bind_generative(config, processor, family, model_config, datasets, answers)
