"""Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, optional SPICE) through pycocoevalcap 1.2.

Official path (Java available): captions are tokenised with pycocoevalcap's Stanford PTB tokenizer
(``-lowerCase -preserveLines``, punctuation tokens removed) and scored with ``Bleu(4)``, ``Meteor``, ``Rouge``
and ``Cider`` exactly as ``COCOEvalCap`` does, so the numbers are the usual COCO-caption numbers.

Fallback path (no ``java`` on PATH, or ``use_java=False``): captions are tokenised with
:func:`python_caption_tokenize`, an approximation of the PTB tokenisation, and scored with pycocoevalcap's
pure-Python BLEU, ROUGE-L and CIDEr. A :class:`UnofficialCaptionMetricsWarning` is issued and the result is
marked ``official=False``: the numbers can differ from the official ones on punctuated text. METEOR needs Java
and is reported as ``None`` with the reason in ``unavailable``.

Scores keep pycocoevalcap's scale (fractions; CIDEr-D is about 0-10) and key names (``Bleu_1`` ... ``Bleu_4``,
``METEOR``, ``ROUGE_L``, ``CIDEr``, ``SPICE``). CIDEr-D takes its idf from the references being scored: with one
image it is always 0, and it is only comparable to published numbers on the full test split.

SPICE (``spice=True``) needs Java and Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on first use
(``spice/get_stanford_models.py``, from nlp.stanford.edu). That download is never attempted here: when the jars
are missing :class:`SpiceUnavailableError` is raised at once with instructions to install them by hand.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CAPTION_METRICS",
    "CaptionScores",
    "SpiceUnavailableError",
    "UnofficialCaptionMetricsWarning",
    "caption_scores",
    "java_available",
    "python_caption_tokenize",
    "spice_models_present",
]

ImageId = Hashable

CAPTION_METRICS: tuple[str, ...] = ("Bleu", "METEOR", "ROUGE_L", "CIDEr")
"""Metric groups computed by default; ``"Bleu"`` yields ``Bleu_1`` ... ``Bleu_4``."""

_INSTALL_HINT = "pip install vlpeft[metrics]"
_SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_SPICE_CORENLP_ZIP_URL = "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"


class UnofficialCaptionMetricsWarning(UserWarning):
    """Caption metrics were computed without Java: Python tokenisation, no METEOR; not the official numbers."""


class SpiceUnavailableError(RuntimeError):
    """SPICE was requested but cannot run (no Java, or the Stanford CoreNLP jars are not installed)."""


@dataclass(frozen=True)
class CaptionScores:
    """Result of :func:`caption_scores`. ``result["CIDEr"]`` reads ``result.scores["CIDEr"]``.

    Attributes:
        scores: metric name -> corpus score (pycocoevalcap scale), or ``None`` when unavailable.
        per_image: metric name -> {image id -> score} for every computed metric.
        tokenizer: ``"ptb"`` (official Stanford PTB tokenizer) or ``"python"`` (:func:`python_caption_tokenize`).
        official: ``True`` only on the Java/PTB path.
        unavailable: metric name -> reason it is ``None``.
        warnings: human-readable warnings issued while scoring.
    """

    scores: dict[str, float | None]
    per_image: dict[str, dict[ImageId, float]] = field(default_factory=dict)
    tokenizer: str = "ptb"
    official: bool = True
    unavailable: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __getitem__(self, metric: str) -> float | None:
        return self.scores[metric]


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (needed for PTB tokenisation, METEOR and SPICE)."""
    return shutil.which("java") is not None


def _import_pycocoevalcap(module: str) -> Any:
    try:
        return __import__(f"pycocoevalcap.{module}", fromlist=["_"])
    except ImportError as error:
        raise ImportError(
            f"caption metrics need the optional dependency pycocoevalcap (failed to import "
            f"pycocoevalcap.{module}: {error}); install it with `{_INSTALL_HINT}`"
        ) from error


def spice_models_present() -> bool:
    """Whether the Stanford CoreNLP 3.6.0 jars that SPICE needs are installed inside pycocoevalcap."""
    spice_module = _import_pycocoevalcap("spice.spice")
    lib_dir = os.path.join(os.path.dirname(os.path.abspath(spice_module.__file__)), "lib")
    return all(os.path.isfile(os.path.join(lib_dir, jar)) for jar in _SPICE_CORENLP_JARS)


# --- pure-Python tokenizer --------------------------------------------------------------------------------------

# PTB escapes brackets as -LRB- etc.; with -lowerCase they become "-lrb-", which pycocoevalcap's punctuation list
# (upper-case "-LRB-") does not remove, so they stay in the official token stream. Mirrored here.
_BRACKET_TOKENS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
_BRACKET_WORDS = frozenset(t.strip() for t in _BRACKET_TOKENS.values())
_BRACKETS = re.compile(r"[()\[\]{}]")
# Marks that PTB splits into tokens of their own which pycocoevalcap then removes.
_ALWAYS_REMOVED = re.compile(r"[;\"`]")
# A single "?" or "!" is removed; a run such as "!!!" is one PTB token that is not in the removal list.
_QUESTION_EXCLAMATION = re.compile(r"[?!]+")
# Comma and colon are removed unless between digits ("1,000", "3:30" stay one token in PTB).
_COMMA_COLON = re.compile(r"(?<!\d)[,:]|[,:](?!\d)")
_CLITICS = frozenset({"n't", "'s", "'re", "'ve", "'ll", "'d", "'m"})
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_REMOVED_TOKENS = frozenset({"'", "''", "-", "--", "...", "."})


def _split_token(token: str) -> list[str]:
    if token in _REMOVED_TOKENS or not token.strip(".-'"):
        return []
    # A final period is split off unless the token has an inner period (abbreviations like "u.s.", "e.g.").
    if token in _BRACKET_WORDS or token in _CLITICS:
        return [token]
    if token.endswith(".") and "." not in token.rstrip("."):
        token = token.rstrip(".")
    token = token.strip("'")
    clitic = _CLITIC.match(token)
    if clitic:
        return [clitic.group(1), clitic.group(2)]
    return [token] if token else []


def python_caption_tokenize(caption: str) -> str:
    """Approximate pycocoevalcap's PTB tokenisation in pure Python; returns space-joined tokens.

    Steps: lowercase; brackets become ``-lrb-``/``-rrb-``/``-lsb-``/``-rsb-``/``-lcb-``/``-rcb-`` tokens (kept, as
    on the official path); ``;``, ``"``, backquotes and single ``?``/``!`` are removed (a run like ``!!!`` stays one
    token); ``,`` and ``:`` are removed unless between digits; split on whitespace; per token, a final ``.`` is
    removed unless the token has an inner period (``u.s.``), surrounding quotes ``'`` are stripped, standalone
    ``-``/``--``/``...`` are dropped, and the clitics ``n't 's 're 've 'll 'd 'm`` are split off (``can't`` ->
    ``ca n't``). Hyphenated words stay one token.

    It agrees with the official tokenisation on ordinary captions but not on every corner case (PTB knows a
    list of abbreviations, splits inner ``...``, handles Unicode quotes, ...), which is why results of the
    fallback path are marked unofficial.
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}: {caption!r}")
    text = " ".join(caption.lower().split())
    text = _BRACKETS.sub(lambda m: _BRACKET_TOKENS[m.group(0)], text)
    text = _ALWAYS_REMOVED.sub(" ", text)
    text = _QUESTION_EXCLAMATION.sub(lambda m: " " if len(m.group(0)) == 1 else f" {m.group(0)} ", text)
    text = _COMMA_COLON.sub(" ", text)
    tokens: list[str] = []
    for raw in text.split():
        tokens.extend(_split_token(raw))
    return " ".join(tokens)


# --- scoring ----------------------------------------------------------------------------------------------------


def _validate(predictions: Mapping, references: Mapping) -> list:
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise TypeError("predictions must be {image_id: caption} and references {image_id: [captions]} mappings")
    if not predictions:
        raise ValueError("predictions is empty; nothing to score")
    missing_refs = [k for k in predictions if k not in references]
    missing_preds = [k for k in references if k not in predictions]
    if missing_refs or missing_preds:
        raise ValueError(
            "predictions and references must have the same image ids (restrict references to the predicted "
            f"images); without references: {missing_refs[:5]}, without prediction: {missing_preds[:5]}"
        )
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"prediction for image {image_id!r} must be one str caption, got {caption!r}")
    for image_id, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence) or len(refs) == 0:
            raise ValueError(f"references for image {image_id!r} must be a non-empty list of str, got {refs!r}")
        for ref in refs:
            if not isinstance(ref, str):
                raise TypeError(f"reference for image {image_id!r} must be a str, got {ref!r}")
    return list(predictions)


def _ptb_tokenize(captions: Mapping[ImageId, Sequence[str]]) -> dict[ImageId, list[str]]:
    tokenizer_module = _import_pycocoevalcap("tokenizer.ptbtokenizer")
    # "\r" would start a new line for the line-preserving Java tokenizer and shift every later caption.
    payload = {k: [{"caption": c.replace("\r", " ")} for c in caps] for k, caps in captions.items()}
    tokenized = tokenizer_module.PTBTokenizer().tokenize(payload)
    for image_id, caps in captions.items():
        if len(tokenized.get(image_id, [])) != len(caps):
            raise RuntimeError(
                f"the PTB tokenizer returned {len(tokenized.get(image_id, []))} captions for image {image_id!r} "
                f"instead of {len(caps)}"
            )
    return tokenized


def _resolve_java(use_java: bool | None) -> bool:
    if use_java is None:
        return java_available()
    if use_java and not java_available():
        raise RuntimeError("use_java=True but no `java` executable is on PATH (OpenJDK 17 works)")
    return bool(use_java)


def _selected_metrics(metrics: Iterable[str]) -> list[str]:
    if isinstance(metrics, str):
        metrics = [metrics]
    chosen = list(dict.fromkeys(metrics))
    unknown = [m for m in chosen if m not in CAPTION_METRICS]
    if unknown or not chosen:
        raise ValueError(f"unknown caption metric(s) {unknown}; choose from {list(CAPTION_METRICS)}")
    return chosen


def _run_meteor(gts: dict, res: dict) -> tuple[float, list[float]]:
    meteor_module = _import_pycocoevalcap("meteor.meteor")
    scorer = meteor_module.Meteor()
    try:
        score, per_image = scorer.compute_score(gts, res)
    except (ValueError, BrokenPipeError) as error:
        raise RuntimeError(f"the METEOR Java process failed ({error}); is a working `java` on PATH?") from error
    finally:
        del scorer  # its __del__ closes and kills the Java process
    return float(score), [float(s) for s in per_image]


def _run_spice(gts: dict, res: dict) -> tuple[float, list[float]]:
    spice_module = _import_pycocoevalcap("spice.spice")
    score, per_image = spice_module.Spice().compute_score(gts, res)
    return float(score), [float(s["All"]["f"]) for s in per_image]


def caption_scores(
    predictions: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
    *,
    use_java: bool | None = None,
    metrics: Iterable[str] = CAPTION_METRICS,
    spice: bool = False,
) -> CaptionScores:
    """Corpus caption metrics of one predicted caption per image against that image's reference captions.

    Args:
        predictions: ``{image_id: caption}``.
        references: ``{image_id: [reference captions]}`` with exactly the same image ids.
        use_java: ``None`` (default) uses Java if ``java`` is on PATH; ``True`` requires it; ``False`` forces the
            pure-Python fallback (unofficial numbers, no METEOR).
        metrics: subset of :data:`CAPTION_METRICS` to compute (METEOR starts a JVM and takes ~7 s).
        spice: also compute SPICE (Java + manually installed Stanford CoreNLP jars; see the module docstring).

    Returns:
        :class:`CaptionScores`.

    Raises:
        ImportError: if pycocoevalcap is not installed (``pip install vlpeft[metrics]``).
        SpiceUnavailableError: if ``spice=True`` and SPICE cannot run; raised before anything is computed.
        ValueError / TypeError: on mismatched image ids or malformed captions.
    """
    image_ids = _validate(predictions, references)
    chosen = _selected_metrics(metrics)
    with_java = _resolve_java(use_java)
    if spice:
        if not with_java:
            raise SpiceUnavailableError("SPICE needs Java, but Java is unavailable or use_java=False")
        if not spice_models_present():
            raise SpiceUnavailableError(
                "SPICE needs the Stanford CoreNLP 3.6.0 jars, which pycocoevalcap would download on first use; "
                "vlpeft never attempts that download. Install them by hand: from "
                f"{_SPICE_CORENLP_ZIP_URL} extract {' and '.join(_SPICE_CORENLP_JARS)} into "
                "pycocoevalcap/spice/lib/, then retry."
            )

    notes: list[str] = []
    unavailable: dict[str, str] = {}
    if with_java:
        gts = _ptb_tokenize(references)
        res = _ptb_tokenize({k: [predictions[k]] for k in image_ids})
        tokenizer = "ptb"
    else:
        gts = {k: [python_caption_tokenize(c) for c in references[k]] for k in image_ids}
        res = {k: [python_caption_tokenize(predictions[k])] for k in image_ids}
        tokenizer = "python"
        message = (
            "caption metrics computed without Java: pure-Python tokenisation instead of the Stanford PTB "
            "tokenizer, so BLEU/ROUGE-L/CIDEr are not the official numbers; METEOR is unavailable"
        )
        warnings.warn(message, UnofficialCaptionMetricsWarning, stacklevel=2)
        notes.append(message)

    scores: dict[str, float | None] = {}
    per_image: dict[str, dict[ImageId, float]] = {}

    def record(name: str, corpus: float, values: Sequence[float]) -> None:
        scores[name] = float(corpus)
        per_image[name] = {k: float(v) for k, v in zip(image_ids, values)}

    if "Bleu" in chosen:
        bleu_module = _import_pycocoevalcap("bleu.bleu")
        with contextlib.redirect_stdout(io.StringIO()):
            corpus, per_order = bleu_module.Bleu(4).compute_score(gts, res, verbose=0)
        for order in range(4):
            record(f"Bleu_{order + 1}", corpus[order], per_order[order])
    if "METEOR" in chosen:
        if with_java:
            record("METEOR", *_run_meteor(gts, res))
        else:
            scores["METEOR"] = None
            unavailable["METEOR"] = "METEOR runs in Java (meteor-1.5.jar); Java is unavailable or use_java=False"
    if "ROUGE_L" in chosen:
        rouge_module = _import_pycocoevalcap("rouge.rouge")
        record("ROUGE_L", *rouge_module.Rouge().compute_score(gts, res))
    if "CIDEr" in chosen:
        cider_module = _import_pycocoevalcap("cider.cider")
        record("CIDEr", *cider_module.Cider().compute_score(gts, res))
        if len(image_ids) == 1:
            notes.append("CIDEr-D with a single image is always 0 (its idf comes from the scored references)")
    if spice:
        record("SPICE", *_run_spice(gts, res))

    return CaptionScores(
        scores=scores,
        per_image=per_image,
        tokenizer=tokenizer,
        official=with_java,
        unavailable=unavailable,
        warnings=notes,
    )
