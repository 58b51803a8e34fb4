"""Task-side inference: answer generation, BLIP-style answer ranking, label-word ranking, classifier argmax and
caption generation, each returning predictions in the official submission formats.

Model I/O is delegated to a :class:`PromptEncoder`, which knows how one model family lays out a prompt and a
target (the same layout the training collator uses). The algorithms here are model-agnostic:

- :func:`sequence_log_likelihoods`: sum of target-token log-probabilities given image + prompt;
- :func:`rank_candidates`: first-token top-k over a candidate list, then full-sequence rescoring (BLIP's VQA
  ``rank`` inference, p-adapter.md §5.2);
- :func:`generate_texts`: batched ``model.generate`` over prompts of equal token length (no padding inside a
  batch, so absolute position embeddings and left/right padding conventions cannot differ from training);
- :func:`classifier_argmax`.

Submission formats: VQA ``[{"question_id", "answer"}]``, COCO captions ``[{"image_id", "caption"}]``, SNLI-VE
``[{"pair_id", "label"}]``, NLVR2 ``[{"identifier", "label"}]``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from vlpeft.tasks.framing import clean_hypothesis, format_prompt

__all__ = [
    "PromptEncoder",
    "sequence_log_likelihoods",
    "rank_candidates",
    "generate_texts",
    "classifier_argmax",
    "predict_vqa",
    "predict_entailment",
    "predict_nlvr2",
    "predict_captions",
]


class PromptEncoder(Protocol):
    """How one model family encodes inference inputs; implemented by
    :class:`vlpeft.tasks.sequence_encoder.SequenceEncoder`, the same object the training collators use.

    - ``encode_prompts(items, prompts)``: the batch's non-text model inputs (``pixel_values`` (batch, 3, H, W))
      and, per example, the exact prompt ids the model sees before the target in training (special and image
      tokens included).
    - ``encode_target(text)``: the target ids as trained after a prompt, ending with the end token.
    - ``text_inputs(prompt_rows, target_rows)``: padded ``input_ids``/``attention_mask`` (+ family extras) of
      ``prompt + target`` rows, as the collator pads them.
    - ``generation_ids(prompt_ids)``: what ``model.generate`` receives as ``input_ids``;
      ``strip_prompt(output_row, prompt_ids)``: the new tokens of one output row; ``decode(ids)``: text.
    - ``supports_ranking``: whether candidates can be scored (decoder-only layouts);
      ``prefix_predicts_first_token``: the model prepends visual positions, the last of which predicts the first
      text token (so an empty prompt is allowed).
    """

    def encode_prompts(
        self, items: Sequence[Mapping[str, Any]], prompts: Sequence[str]
    ) -> tuple[dict[str, torch.Tensor], list[list[int]]]: ...

    def encode_target(self, text: str) -> list[int]: ...

    def text_inputs(
        self, prompt_rows: Sequence[Sequence[int]], target_rows: Sequence[Sequence[int]]
    ) -> dict[str, torch.Tensor]: ...

    def generation_ids(self, prompt_ids: list[int]) -> list[int]: ...

    def strip_prompt(self, generated: Sequence[int], prompt_ids: Sequence[int]) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    def pad_token_id(self) -> int: ...

    @property
    def supports_ranking(self) -> bool: ...

    @property
    def prefix_predicts_first_token(self) -> bool: ...


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _select(extra: Mapping[str, torch.Tensor], rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-row model inputs: ``extra[k][rows]`` for every batch-first tensor."""
    return {k: v.index_select(0, rows.to(v.device)).to(device) for k, v in extra.items()}


def _predictive_logits(model: nn.Module, inputs: dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """(batch, length, vocab) logits where row ``j`` is the distribution of text token ``j`` given everything
    before it. Models that prepend visual positions return longer logits; their last prefix position predicts
    token 0. Without a prefix, row 0 has no predictor and is filled with NaN."""
    logits = model(**inputs).logits
    extra = logits.shape[1] - length
    if extra < 0:
        raise ValueError(f"model returned logits for {logits.shape[1]} positions, fewer than the {length} input ids")
    if extra > 0:
        return logits[:, extra - 1 : extra - 1 + length]
    first = torch.full_like(logits[:, :1], float("nan"))
    return torch.cat([first, logits[:, :-1]], dim=1)


def _check_ranking(encoder: PromptEncoder, prompt_ids: Sequence[Sequence[int]]) -> None:
    if not encoder.supports_ranking:
        raise ValueError("this model family cannot score candidates (its target is not in input_ids); use "
                         "generation instead of ranking")
    if not encoder.prefix_predicts_first_token and any(len(p) == 0 for p in prompt_ids):
        raise ValueError("an empty prompt leaves the first target token without a predicting position")


@torch.no_grad()
def sequence_log_likelihoods(
    model: nn.Module,
    encoder: PromptEncoder,
    extra: Mapping[str, torch.Tensor],
    prompt_ids: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    example_index: Sequence[int],
    chunk_size: int = 64,
) -> torch.Tensor:
    """Sum of log p(target tokens | image, prompt) for each (example, target) row.

    Args:
        encoder: pads ``prompt + target`` rows as in training (:meth:`PromptEncoder.text_inputs`).
        extra: batch-first non-text inputs of the examples (e.g. ``pixel_values`` (n_examples, 3, H, W)).
        prompt_ids: per-example prompt ids.
        targets: per-row target ids (non-empty).
        example_index: per-row index into the examples.
        chunk_size: rows per forward pass.

    Returns:
        (n_rows,) float32 tensor of summed log-probabilities.
    """
    if len(targets) != len(example_index):
        raise ValueError(f"{len(targets)} targets but {len(example_index)} example indices")
    _check_ranking(encoder, prompt_ids)
    device = _model_device(model)
    scores = torch.empty(len(targets), dtype=torch.float32)
    for start in range(0, len(targets), chunk_size):
        rows = list(range(start, min(start + chunk_size, len(targets))))
        if any(not targets[r] for r in rows):
            raise ValueError("every target must hold at least one token")
        text = encoder.text_inputs([prompt_ids[example_index[r]] for r in rows], [targets[r] for r in rows])
        index = torch.tensor([example_index[r] for r in rows])
        inputs = {**{k: v.to(device) for k, v in text.items()}, **_select(extra, index, device)}
        log_probs = _predictive_logits(model, inputs, text["input_ids"].shape[1]).float().log_softmax(-1)
        for j, r in enumerate(rows):
            p = len(prompt_ids[example_index[r]])
            t = torch.tensor(targets[r], device=device)
            picked = log_probs[j, p : p + len(t)].gather(-1, t.unsqueeze(-1)).squeeze(-1)
            scores[r] = picked.sum().cpu()
    return scores


@torch.no_grad()
def _next_token_log_probs(
    model: nn.Module, encoder: PromptEncoder, extra: Mapping[str, torch.Tensor], prompt_ids: Sequence[Sequence[int]]
) -> torch.Tensor:
    """(n_examples, vocab) log-distribution of the first target token after each prompt."""
    device = _model_device(model)
    # one dummy target token per row keeps the layout (and PaliGemma's token types) as in scoring
    dummy = [[encoder.pad_token_id]] * len(prompt_ids)
    text = encoder.text_inputs(prompt_ids, dummy)
    inputs = {**{k: v.to(device) for k, v in text.items()}, **{k: v.to(device) for k, v in extra.items()}}
    logits = _predictive_logits(model, inputs, text["input_ids"].shape[1]).float()
    first = torch.tensor([len(p) for p in prompt_ids], device=device)
    return logits[torch.arange(len(prompt_ids), device=device), first].log_softmax(-1).cpu()


def rank_candidates(
    model: nn.Module,
    encoder: PromptEncoder,
    extra: Mapping[str, torch.Tensor],
    prompt_ids: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[int]],
    top_k: int = 32,
) -> list[int]:
    """Pick one candidate per example: keep the ``top_k`` candidates whose first token is most likely after the
    prompt, rescore those by full-sequence log-likelihood, return the argmax (index into ``candidates``).

    With ``top_k >= len(candidates)`` this is exact ranking by sequence log-likelihood.
    """
    if not candidates:
        raise ValueError("rank_candidates needs at least one candidate")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    _check_ranking(encoder, prompt_ids)
    k = min(top_k, len(candidates))
    if k == len(candidates):
        keep = torch.arange(k).expand(len(prompt_ids), k)
    else:
        first = torch.tensor([c[0] for c in candidates])
        first_scores = _next_token_log_probs(model, encoder, extra, prompt_ids)[:, first]  # (n, n_candidates)
        keep = first_scores.topk(k, dim=-1).indices  # (n, k)
    rows_target, rows_example = [], []
    for i in range(len(prompt_ids)):
        for c in keep[i].tolist():
            rows_target.append(candidates[c])
            rows_example.append(i)
    scores = sequence_log_likelihoods(model, encoder, extra, prompt_ids, rows_target, rows_example)
    best = scores.view(len(prompt_ids), k).argmax(-1)
    return [int(keep[i, best[i]]) for i in range(len(prompt_ids))]


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    encoder: PromptEncoder,
    extra: Mapping[str, torch.Tensor],
    prompt_ids: Sequence[Sequence[int]],
    **generate_kwargs: Any,
) -> list[str]:
    """Generate a continuation of each prompt and decode it (the prompt itself is removed).

    Examples are grouped by prompt length and each group is one ``generate`` call, so no padding is needed.
    """
    device = _model_device(model)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompt_ids):
        groups[len(encoder.generation_ids(list(p)))].append(i)
    texts: list[str] = [""] * len(prompt_ids)
    for members in groups.values():
        index = torch.tensor(members)
        gen_ids = torch.tensor([encoder.generation_ids(list(prompt_ids[i])) for i in members], dtype=torch.long)
        out = model.generate(
            input_ids=gen_ids.to(device),
            attention_mask=torch.ones_like(gen_ids).to(device),
            **_select(extra, index, device),
            **generate_kwargs,
        )
        for row, i in enumerate(members):
            texts[i] = encoder.decode(encoder.strip_prompt(out[row].tolist(), prompt_ids[i]))
    return texts


@torch.no_grad()
def classifier_argmax(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> list[int]:
    """Argmax class of a classification model's logits (batch, num_labels)."""
    device = _model_device(model)
    logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
    if logits.dim() != 2:
        raise ValueError(f"classifier logits must be (batch, num_labels), got shape {tuple(logits.shape)}")
    return logits.argmax(-1).tolist()


# ------------------------------------------------------------------------------------------- task level
def _batches(indices: Sequence[int], batch_size: int):
    for start in range(0, len(indices), batch_size):
        yield list(indices[start : start + batch_size])


def _was_training(model: nn.Module) -> bool:
    training = model.training
    model.eval()
    return training


def predict_vqa(
    model: nn.Module,
    dataset: Sequence[Mapping[str, Any]],
    *,
    mode: str,
    prompt_template: str = "{question}",
    encoder: PromptEncoder | None = None,
    answer_list: Sequence[str] | None = None,
    classify_inputs: Any = None,
    indices: Sequence[int] | None = None,
    batch_size: int = 8,
    top_k: int = 32,
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """VQA predictions ``[{"question_id", "answer"}]``.

    Args:
        mode: ``"generate"`` (free generation), ``"rank"`` (rank ``answer_list`` by first-token top-k then
            sequence likelihood) or ``"classify"`` (argmax over ``answer_list`` = the classifier's vocabulary;
            ``classify_inputs(items)`` builds the classifier's model inputs).
        prompt_template: format string over the item's fields (``{question}``).
        indices: subset of dataset positions to predict (default all), e.g. this process's shard.
    """
    training = _was_training(model)
    indices = list(range(len(dataset))) if indices is None else list(indices)
    if mode in ("rank", "classify") and not answer_list:
        raise ValueError(f"VQA inference mode {mode!r} needs an answer_list")
    if mode in ("rank", "generate") and encoder is None:
        raise ValueError(f"VQA inference mode {mode!r} needs a prompt encoder")
    candidates = [encoder.encode_target(a) for a in answer_list] if mode == "rank" else None
    results: list[dict[str, Any]] = []
    try:
        for batch in _batches(indices, batch_size):
            items = [dataset[i] for i in batch]
            if mode == "classify":
                if classify_inputs is None:
                    raise ValueError("VQA mode 'classify' needs classify_inputs")
                answers = [answer_list[c] for c in classifier_argmax(model, classify_inputs(items))]
            else:
                prompts = [format_prompt(prompt_template, question=item["question"].strip()) for item in items]
                extra, prompt_ids = encoder.encode_prompts(items, prompts)
                if mode == "rank":
                    picks = rank_candidates(model, encoder, extra, prompt_ids, candidates, top_k)
                    answers = [answer_list[c] for c in picks]
                elif mode == "generate":
                    answers = generate_texts(model, encoder, extra, prompt_ids, **generate_kwargs)
                else:
                    raise ValueError(f"VQA inference mode must be generate, rank or classify, got {mode!r}")
            results.extend({"question_id": it["question_id"], "answer": a} for it, a in zip(items, answers))
    finally:
        model.train(training)
    return results


def predict_entailment(
    model: nn.Module,
    dataset: Sequence[Mapping[str, Any]],
    *,
    mode: str,
    label_words: Mapping[str, str],
    prompt_template: str = "Is it correct that {hypothesis}?",
    encoder: PromptEncoder | None = None,
    classify_inputs: Any = None,
    indices: Sequence[int] | None = None,
    batch_size: int = 8,
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """SNLI-VE predictions ``[{"pair_id", "label"}]`` (canonical labels ``entailment``/``neutral``/``contradiction``).

    ``mode="rank"`` scores the label words (e.g. Correct / Ambiguous / Incorrect) after the prompt and picks the most
    likely; ``mode="classify"`` takes the argmax of a 3-way classifier whose classes follow ``label_words`` order;
    ``mode="generate"`` generates after the prompt (encoder-decoder models) and maps the text to the label whose word
    it is, as NLVR2 does (:func:`predict_nlvr2`): any other text is kept as the ``label``, which the entailment
    metric with ``invalid="wrong"`` counts as wrong and invalid. ``generate_kwargs`` go to ``model.generate``.
    """
    if mode not in ("rank", "classify", "generate"):
        raise ValueError(f"entailment inference mode must be rank, classify or generate, got {mode!r}")
    if mode in ("rank", "generate") and encoder is None:
        raise ValueError(f"entailment mode {mode!r} needs a prompt encoder")
    training = _was_training(model)
    labels = list(label_words)
    indices = list(range(len(dataset))) if indices is None else list(indices)
    candidates = [encoder.encode_target(label_words[lab]) for lab in labels] if mode == "rank" else None
    results: list[dict[str, Any]] = []
    try:
        for batch in _batches(indices, batch_size):
            items = [dataset[i] for i in batch]
            if mode == "classify":
                if classify_inputs is None:
                    raise ValueError("entailment mode 'classify' needs classify_inputs")
                picked = [labels[c] for c in classifier_argmax(model, classify_inputs(items))]
            else:
                prompts = [format_prompt(prompt_template, hypothesis=clean_hypothesis(item["hypothesis"]))
                           for item in items]
                picked = _labels_by_prompt(model, encoder, items, prompts, candidates, label_words, generate_kwargs)
            results.extend({"pair_id": it["pair_id"], "label": p} for it, p in zip(items, picked))
    finally:
        model.train(training)
    return results


def _labels_by_prompt(
    model: nn.Module,
    encoder: PromptEncoder,
    items: Sequence[Mapping[str, Any]],
    prompts: list[str],
    candidates: list[Any] | None,
    label_words: Mapping[str, str],
    generate_kwargs: Mapping[str, Any],
) -> list[str]:
    """One label per item after its prompt: ranked over the encoded label words ``candidates`` (in the order of
    ``label_words``), or, when ``candidates`` is None, generated and mapped by :func:`_label_of`."""
    extra, prompt_ids = encoder.encode_prompts(items, prompts)
    labels = list(label_words)
    if candidates is not None:
        return [labels[c] for c in rank_candidates(model, encoder, extra, prompt_ids, candidates, len(labels))]
    texts = generate_texts(model, encoder, extra, prompt_ids, **generate_kwargs)
    return [_label_of(text, label_words) for text in texts]


def _label_of(text: str, label_words: Mapping[str, str]) -> str:
    """The label whose word ``text`` is (case-insensitive, end punctuation ignored), else ``text`` itself."""
    said = text.strip().rstrip(".!").strip().lower()
    for label, word in label_words.items():
        if said == word.strip().lower():
            return label
    return text


def predict_nlvr2(
    model: nn.Module,
    dataset: Sequence[Mapping[str, Any]],
    *,
    mode: str,
    label_words: Mapping[str, str],
    prompt_template: str,
    encoder: PromptEncoder,
    indices: Sequence[int] | None = None,
    batch_size: int = 8,
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """NLVR2 predictions ``[{"identifier", "label"}]`` (``"True"`` / ``"False"``); both images of each pair go to the
    model (``pixel_values`` (batch, 2, 3, H, W), :meth:`PromptEncoder.encode_prompts`).

    ``mode="rank"`` scores the label words after the prompt and picks the more likely (decoder-only layouts);
    ``mode="generate"`` generates (VL-T5 / VL-Adapter) and maps the text to the label whose word it is
    (case-insensitive); any other text is kept as the ``label``, which the NLVR2 metric then counts as wrong.
    ``generate_kwargs`` go to ``model.generate``.
    """
    if mode not in ("rank", "generate"):
        raise ValueError(f"NLVR2 inference mode must be rank or generate, got {mode!r}")
    training = _was_training(model)
    labels = list(label_words)
    indices = list(range(len(dataset))) if indices is None else list(indices)
    candidates = [encoder.encode_target(label_words[label]) for label in labels] if mode == "rank" else None
    results: list[dict[str, Any]] = []
    try:
        for batch in _batches(indices, batch_size):
            items = [dataset[i] for i in batch]
            prompts = [format_prompt(prompt_template, sentence=item["sentence"].strip()) for item in items]
            picked = _labels_by_prompt(model, encoder, items, prompts, candidates, label_words, generate_kwargs)
            results.extend({"identifier": it["identifier"], "label": p} for it, p in zip(items, picked))
    finally:
        model.train(training)
    return results


def predict_captions(
    model: nn.Module,
    dataset: Sequence[Mapping[str, Any]],
    *,
    encoder: PromptEncoder,
    prompt: str = "a picture of",
    indices: Sequence[int] | None = None,
    batch_size: int = 8,
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """Caption predictions ``[{"image_id", "caption"}]`` (one per image; the prompt is not part of the caption).

    ``dataset`` should be an image-level view (one item per image). ``generate_kwargs`` go to ``model.generate``
    (``num_beams``, ``max_new_tokens``, ``min_new_tokens``...).
    """
    training = _was_training(model)
    indices = list(range(len(dataset))) if indices is None else list(indices)
    results: list[dict[str, Any]] = []
    try:
        for batch in _batches(indices, batch_size):
            items = [dataset[i] for i in batch]
            extra, prompt_ids = encoder.encode_prompts(items, [prompt.strip()] * len(items))
            texts = generate_texts(model, encoder, extra, prompt_ids, **generate_kwargs)
            results.extend({"image_id": it["image_id"], "caption": t} for it, t in zip(items, texts))
    finally:
        model.train(training)
    return results
