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
``[{"pair_id", "label"}]``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "PromptEncoder",
    "sequence_log_likelihoods",
    "rank_candidates",
    "generate_texts",
    "classifier_argmax",
    "predict_vqa",
    "predict_entailment",
    "predict_captions",
]


class PromptEncoder(Protocol):
    """How one model family encodes inference inputs (implemented by the task collators).

    ``encode_prompts(items, prompts)`` returns the batch's non-text model inputs (``pixel_values`` of shape
    (batch, 3, H, W), plus e.g. ``token_type_ids``-free extras) and, per example, the exact prompt token ids the
    model sees before the target during training (special and image tokens included). ``encode_target(text)``
    returns the target token ids as trained (ending with the end-of-sequence token). ``generation_ids(prompt)``
    returns what ``model.generate`` must receive as ``input_ids`` for that prompt (BLIP drops the last id).
    ``decode(ids)`` turns generated ids into text.
    """

    def encode_prompts(
        self, items: Sequence[Mapping[str, Any]], prompts: Sequence[str]
    ) -> tuple[dict[str, torch.Tensor], list[list[int]]]: ...

    def encode_target(self, text: str) -> list[int]: ...

    def generation_ids(self, prompt_ids: list[int]) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    def pad_token_id(self) -> int: ...


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _select(extra: Mapping[str, torch.Tensor], rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-row model inputs: ``extra[k][rows]`` for every batch-first tensor."""
    return {k: v.index_select(0, rows.to(v.device)).to(device) for k, v in extra.items()}


def _right_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _text_logits(model: nn.Module, inputs: dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """Logits aligned with ``input_ids`` (batch, length, vocab); models that prepend visual positions to the
    sequence (prefix models) return longer logits whose last ``length`` positions belong to the text."""
    logits = model(**inputs).logits
    if logits.shape[1] < length:
        raise ValueError(f"model returned logits for {logits.shape[1]} positions, fewer than the {length} input ids")
    return logits[:, logits.shape[1] - length :]


@torch.no_grad()
def sequence_log_likelihoods(
    model: nn.Module,
    extra: Mapping[str, torch.Tensor],
    prompt_ids: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    example_index: Sequence[int],
    pad_token_id: int,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Sum of log p(target tokens | image, prompt) for each (example, target) row.

    Args:
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
    device = _model_device(model)
    scores = torch.empty(len(targets), dtype=torch.float32)
    for start in range(0, len(targets), chunk_size):
        rows = range(start, min(start + chunk_size, len(targets)))
        seqs = []
        for r in rows:
            if not targets[r]:
                raise ValueError(f"target {r} is empty")
            seqs.append(list(prompt_ids[example_index[r]]) + list(targets[r]))
        ids, mask = _right_pad(seqs, pad_token_id)
        index = torch.tensor([example_index[r] for r in rows])
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), **_select(extra, index, device)}
        log_probs = _text_logits(model, inputs, ids.shape[1]).float().log_softmax(-1)
        for j, r in enumerate(rows):
            p = len(prompt_ids[example_index[r]])
            t = torch.tensor(targets[r], device=device)
            # the token at position p + i is predicted by the logits at position p + i - 1
            picked = log_probs[j, p - 1 : p - 1 + len(t)].gather(-1, t.unsqueeze(-1)).squeeze(-1)
            scores[r] = picked.sum().cpu()
    return scores


@torch.no_grad()
def _next_token_log_probs(
    model: nn.Module, extra: Mapping[str, torch.Tensor], prompt_ids: Sequence[Sequence[int]], pad_token_id: int
) -> torch.Tensor:
    """(n_examples, vocab) log-distribution of the first target token after each prompt."""
    device = _model_device(model)
    ids, mask = _right_pad(prompt_ids, pad_token_id)
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), **{k: v.to(device) for k, v in extra.items()}}
    logits = _text_logits(model, inputs, ids.shape[1]).float()
    last = torch.tensor([len(p) - 1 for p in prompt_ids], device=device)
    return logits[torch.arange(len(prompt_ids), device=device), last].log_softmax(-1).cpu()


def rank_candidates(
    model: nn.Module,
    extra: Mapping[str, torch.Tensor],
    prompt_ids: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[int]],
    pad_token_id: int,
    top_k: int = 32,
) -> list[int]:
    """Pick one candidate per example: keep the ``top_k`` candidates whose first token is most likely after the
    prompt, rescore those by full-sequence log-likelihood, return the argmax (index into ``candidates``).

    With ``top_k >= len(candidates)`` this is exact ranking by sequence log-likelihood.
    """
    if not candidates:
        raise ValueError("rank_candidates needs at least one candidate")
    k = min(top_k, len(candidates))
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    first = torch.tensor([c[0] for c in candidates])
    first_scores = _next_token_log_probs(model, extra, prompt_ids, pad_token_id)[:, first]  # (n, n_candidates)
    keep = first_scores.topk(k, dim=-1).indices  # (n, k)
    rows_target, rows_example = [], []
    for i in range(len(prompt_ids)):
        for c in keep[i].tolist():
            rows_target.append(candidates[c])
            rows_example.append(i)
    scores = sequence_log_likelihoods(model, extra, prompt_ids, rows_target, rows_example, pad_token_id)
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
            seq = out[row].tolist()
            prompt = list(prompt_ids[i])
            if seq[: len(prompt)] == prompt:
                seq = seq[len(prompt) :]
            texts[i] = encoder.decode(seq).strip()
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
                prompts = [prompt_template.format(**item) for item in items]
                extra, prompt_ids = encoder.encode_prompts(items, prompts)
                if mode == "rank":
                    picks = rank_candidates(model, extra, prompt_ids, candidates, encoder.pad_token_id, top_k)
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
) -> list[dict[str, Any]]:
    """SNLI-VE predictions ``[{"pair_id", "label"}]`` (canonical labels ``entailment``/``neutral``/``contradiction``).

    ``mode="rank"`` scores the label words (e.g. Correct / Ambiguous / Incorrect) after the prompt and picks the most
    likely; ``mode="classify"`` takes the argmax of a 3-way classifier whose classes follow ``label_words`` order.
    """
    from vlpeft.tasks.framing import clean_hypothesis

    training = _was_training(model)
    labels = list(label_words)
    indices = list(range(len(dataset))) if indices is None else list(indices)
    if mode == "rank" and encoder is None:
        raise ValueError("entailment mode 'rank' needs a prompt encoder")
    candidates = [encoder.encode_target(label_words[lab]) for lab in labels] if mode == "rank" else None
    results: list[dict[str, Any]] = []
    try:
        for batch in _batches(indices, batch_size):
            items = [dataset[i] for i in batch]
            if mode == "rank":
                prompts = [prompt_template.format(**{**item, "hypothesis": clean_hypothesis(item["hypothesis"])})
                           for item in items]
                extra, prompt_ids = encoder.encode_prompts(items, prompts)
                picks = rank_candidates(model, extra, prompt_ids, candidates, encoder.pad_token_id, len(labels))
            elif mode == "classify":
                if classify_inputs is None:
                    raise ValueError("entailment mode 'classify' needs classify_inputs")
                picks = classifier_argmax(model, classify_inputs(items))
            else:
                raise ValueError(f"entailment inference mode must be rank or classify, got {mode!r}")
            results.extend({"pair_id": it["pair_id"], "label": labels[c]} for it, c in zip(items, picks))
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
            extra, prompt_ids = encoder.encode_prompts(items, [prompt] * len(items))
            texts = generate_texts(model, encoder, extra, prompt_ids, **generate_kwargs)
            results.extend({"image_id": it["image_id"], "caption": t} for it, t in zip(items, texts))
    finally:
        model.train(training)
    return results
