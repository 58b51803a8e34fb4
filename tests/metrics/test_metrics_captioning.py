"""Caption metrics: hand-worked BLEU / ROUGE-L / CIDEr-D values, independent re-computation from the
definitions, Java (PTB) vs pure-Python agreement, METEOR once, SPICE and missing-dependency errors."""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections import Counter

import pytest

import vlpeft.metrics.captioning as captioning
from vlpeft.metrics import (
    SpiceUnavailableError,
    UnofficialCaptionMetricsWarning,
    caption_scores,
    java_available,
    python_caption_tokenize,
)

needs_java = pytest.mark.skipif(not java_available(), reason="needs a java executable on PATH")
FAST = ("Bleu", "ROUGE_L", "CIDEr")


def python_scores(predictions, references, metrics=FAST):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnofficialCaptionMetricsWarning)
        return caption_scores(predictions, references, use_java=False, metrics=metrics)


# --- independent implementations from the metric definitions ----------------------------------------------------


def ngrams(words, n):
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def reference_bleu(predictions, references, max_n=4):
    """Corpus BLEU with clipped counts and the 'closest' reference length (pycocoevalcap's definition)."""
    correct, guess = [0] * max_n, [0] * max_n
    test_len = ref_len = 0
    for key, hyp in predictions.items():
        words = hyp.split()
        refs = [r.split() for r in references[key]]
        test_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in refs)[1]
        for n in range(1, max_n + 1):
            max_ref = Counter()
            for r in refs:
                max_ref |= ngrams(r, n)
            hyp_counts = ngrams(words, n)
            correct[n - 1] += sum(min(c, max_ref[g]) for g, c in hyp_counts.items())
            guess[n - 1] += max(0, len(words) - n + 1)
    brevity = math.exp(1 - ref_len / test_len) if test_len < ref_len else 1.0
    out, product = [], 1.0
    for n in range(max_n):
        product *= correct[n] / guess[n]
        out.append(brevity * product ** (1 / (n + 1)))
    return out


def lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            table[i + 1][j + 1] = table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def reference_rouge_l(hyp, refs, beta=1.2):
    words = hyp.split()
    precision = max(lcs(words, r.split()) / len(words) for r in refs)
    recall = max(lcs(words, r.split()) / len(r.split()) for r in refs)
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def reference_cider_d(predictions, references, sigma=6.0):
    """CIDEr-D: tf-idf n-gram vectors (idf from the scored references), clipped cosine, Gaussian length penalty."""
    keys = list(predictions)
    log_images = math.log(len(keys))
    doc_freq = Counter()
    for key in keys:
        doc_freq.update({g for r in references[key] for n in range(1, 5) for g in ngrams(r.split(), n)})

    def vectors(sentence):
        words = sentence.split()
        vecs = [{g: c * (log_images - math.log(max(1.0, doc_freq[g]))) for g, c in ngrams(words, n).items()}
                for n in range(1, 5)]
        return vecs, max(len(words) - 1, 0)  # pycocoevalcap's "length" counts bigrams

    per_image = []
    for key in keys:
        hyp_vecs, hyp_len = vectors(predictions[key])
        total = 0.0
        for ref in references[key]:
            ref_vecs, ref_len = vectors(ref)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma**2))
            for h, r in zip(hyp_vecs, ref_vecs):
                norm_h = math.sqrt(sum(v * v for v in h.values()))
                norm_r = math.sqrt(sum(v * v for v in r.values()))
                dot = sum(min(v, r.get(g, 0.0)) * r.get(g, 0.0) for g, v in h.items())
                if norm_h and norm_r:
                    total += dot / (norm_h * norm_r) * penalty / 4
        per_image.append(10.0 * total / len(references[key]))
    return sum(per_image) / len(per_image)


TINY_PREDICTIONS = {
    "img1": "a man riding a wave on a surfboard",
    "img2": "two dogs playing in the snow",
    "img3": "a cat",
}
TINY_REFERENCES = {
    "img1": ["a man riding a wave on top of a surfboard", "a surfer rides a large wave"],
    "img2": ["two dogs play in the snow together", "a pair of dogs running through snow", "dogs in snow"],
    "img3": ["a small cat sat on the mat", "a cat on a mat"],
}


# --- hand-worked values ------------------------------------------------------------------------------------------


def test_bleu_hand_worked_single_caption():
    # Clipped precisions: 1-gram 5/6 ("the" clipped to 1), 2-gram 3/5, 3-gram 2/4, 4-gram 1/3; equal lengths.
    result = python_scores({0: "the cat sat on the mat"}, {0: ["the cat sat on a mat"]}, metrics=["Bleu"])
    assert result["Bleu_1"] == pytest.approx(5 / 6, rel=1e-8)
    assert result["Bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), rel=1e-8)
    assert result["Bleu_3"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4) ** (1 / 3), rel=1e-8)
    assert result["Bleu_4"] == pytest.approx((1 / 12) ** (1 / 4), rel=1e-8)


def test_bleu_brevity_penalty_hand_worked():
    # 3 hypothesis words, all n-grams found, against a 6-word reference: brevity penalty exp(1 - 6/3).
    result = python_scores({0: "a small cat"}, {0: ["a small cat sat on mats"]}, metrics=["Bleu"])
    for n in (1, 2, 3):
        assert result[f"Bleu_{n}"] == pytest.approx(math.exp(-1), rel=1e-8)
    # No 4-grams at all: pycocoevalcap's smoothing makes that precision (0 + 1e-15) / (0 + 1e-9) = 1e-6.
    assert result["Bleu_4"] == pytest.approx(1e-6 ** 0.25 * math.exp(-1), rel=1e-6)


def test_rouge_l_hand_worked():
    # LCS("a cat", "a small cat sat") = 2: P = 1, R = 0.5, F_beta(1.2) = 2.44 * 0.5 / (0.5 + 1.44).
    result = python_scores({0: "a cat"}, {0: ["a small cat sat"]}, metrics=["ROUGE_L"])
    assert result["ROUGE_L"] == pytest.approx(1.22 / 1.94, rel=1e-12)


def test_cider_hand_worked_values():
    # Two images, perfect 2-word captions, no shared n-grams: cosine 1 for 1- and 2-grams, 0 for 3-/4-grams,
    # so each image scores 10 * (1 + 1 + 0 + 0) / 4 = 5.
    refs = {"a": ["red bus"], "b": ["green tree"]}
    assert python_scores({"a": "red bus", "b": "green tree"}, refs)["CIDEr"] == pytest.approx(5.0)
    # A wrong caption on image b scores 0 there: corpus CIDEr 2.5.
    assert python_scores({"a": "red bus", "b": "blue car"}, refs)["CIDEr"] == pytest.approx(2.5)
    # Hypothesis "red" against "red bus": unigram cosine 1/sqrt(2), length penalty exp(-1/72).
    partial = python_scores({"a": "red", "b": "green tree"}, refs).per_image["CIDEr"]["a"]
    assert partial == pytest.approx(10 * (2**-0.5) * math.exp(-1 / 72) / 4)
    # If "red" appears in every image's references its idf is 0 and the same hypothesis scores 0.
    shared = python_scores({"a": "red", "b": "red tree"}, {"a": ["red bus"], "b": ["red tree"]})
    assert shared.per_image["CIDEr"]["a"] == 0.0


def test_cider_is_zero_with_a_single_image():
    result = python_scores({0: "a red bus"}, {0: ["a red bus"]})
    assert result["CIDEr"] == 0.0
    assert any("single image" in w for w in result.warnings)


# --- independent re-computation on a small corpus ---------------------------------------------------------------


def test_python_path_matches_independent_definitions():
    result = python_scores(TINY_PREDICTIONS, TINY_REFERENCES)
    expected_bleu = reference_bleu(TINY_PREDICTIONS, TINY_REFERENCES)
    for n in range(4):
        assert result[f"Bleu_{n + 1}"] == pytest.approx(expected_bleu[n], rel=1e-6)
    expected_rouge = [reference_rouge_l(TINY_PREDICTIONS[k], TINY_REFERENCES[k]) for k in TINY_PREDICTIONS]
    assert result["ROUGE_L"] == pytest.approx(sum(expected_rouge) / 3, rel=1e-12)
    assert result["CIDEr"] == pytest.approx(reference_cider_d(TINY_PREDICTIONS, TINY_REFERENCES), rel=1e-9)
    assert result.per_image["ROUGE_L"]["img3"] == pytest.approx(expected_rouge[2])


def test_python_path_metadata_and_warning():
    with pytest.warns(UnofficialCaptionMetricsWarning, match="not the official"):
        result = caption_scores(TINY_PREDICTIONS, TINY_REFERENCES, use_java=False)
    assert result.tokenizer == "python" and result.official is False
    assert result["METEOR"] is None and "Java" in result.unavailable["METEOR"]
    assert set(result.scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert result.warnings


# --- pure-Python tokenizer ---------------------------------------------------------------------------------------

TOKENIZER_CASES = {
    "A man riding a wave on top of a surfboard.": "a man riding a wave on top of a surfboard",
    "Two dogs playing in the snow!": "two dogs playing in the snow",
    "A black-and-white photo of a cat.": "a black-and-white photo of a cat",
    "A dog's toy, on the grass.": "a dog 's toy on the grass",
    "It can't be; it won't fly.": "it ca n't be it wo n't fly",
    'A sign that says "STOP".': "a sign that says stop",
    "A train (with red cars).": "a train -lrb- with red cars -rrb-",
    "At 3:30 pm, 1,000 hot dogs.": "at 3:30 pm 1,000 hot dogs",
    "A 2.5 meter giraffe.": "a 2.5 meter giraffe",
    "The man's hat -- it's blue...": "the man 's hat it 's blue",
    "a kid 's bike": "a kid 's bike",
    "The U.S. flag": "the u.s. flag",
    "Some 'quoted' words": "some quoted words",
    "Wow!!!": "wow !!!",
}


@pytest.mark.parametrize("caption, expected", list(TOKENIZER_CASES.items()))
def test_python_tokenizer_hand_cases(caption, expected):
    assert python_caption_tokenize(caption) == expected


@needs_java
def test_python_tokenizer_agrees_with_ptb_on_ordinary_captions():
    ptb_module = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    captions = list(TOKENIZER_CASES)
    ptb = ptb_module.PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert [ptb[i][0] for i in range(len(captions))] == [python_caption_tokenize(c) for c in captions]


# --- Java path ---------------------------------------------------------------------------------------------------


@needs_java
def test_java_and_python_paths_agree_on_lowercase_unpunctuated_text():
    java = caption_scores(TINY_PREDICTIONS, TINY_REFERENCES, use_java=True, metrics=FAST)
    python = python_scores(TINY_PREDICTIONS, TINY_REFERENCES)
    assert java.tokenizer == "ptb" and java.official is True and not java.warnings
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert java[name] == pytest.approx(python[name], rel=1e-12), name


@needs_java
def test_java_path_tokenizes_punctuation_and_keeps_captions_aligned():
    predictions = {1: "A Red Bus.", 2: "", 3: "Green\r tree!"}
    references = {1: ["a red bus", "A red bus, parked."], 2: ["a dog"], 3: ["green tree"]}
    java = caption_scores(predictions, references, use_java=True, metrics=["Bleu", "CIDEr"])
    plain = python_scores({1: "a red bus", 2: "", 3: "green tree"},
                          {1: ["a red bus", "a red bus parked"], 2: ["a dog"], 3: ["green tree"]},
                          metrics=["Bleu", "CIDEr"])
    assert java.per_image["CIDEr"][2] == 0.0
    assert java["CIDEr"] == pytest.approx(plain["CIDEr"], rel=1e-12)
    assert java["Bleu_1"] == pytest.approx(plain["Bleu_1"], rel=1e-12)


@needs_java
def test_meteor_runs_once_through_java():
    predictions = {"good": "a man riding a wave on a surfboard", "bad": "a plate of food"}
    references = {"good": ["a man riding a wave on top of a surfboard"], "bad": ["a dog running on the beach"]}
    result = caption_scores(predictions, references, use_java=True, metrics=["METEOR"])
    assert set(result.scores) == {"METEOR"}
    assert 0.0 < result["METEOR"] < 1.0
    assert result.per_image["METEOR"]["good"] > 0.3 > result.per_image["METEOR"]["bad"]


def test_use_java_true_without_java_raises(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    assert java_available() is False
    with pytest.raises(RuntimeError, match="no `java` executable"):
        caption_scores(TINY_PREDICTIONS, TINY_REFERENCES, use_java=True)
    with pytest.warns(UnofficialCaptionMetricsWarning):  # auto-detection falls back to Python
        result = caption_scores(TINY_PREDICTIONS, TINY_REFERENCES, metrics=["CIDEr"])
    assert result.tokenizer == "python"


# --- SPICE and dependency errors ---------------------------------------------------------------------------------


def test_spice_without_stanford_models_fails_fast(monkeypatch):
    monkeypatch.setattr(captioning, "spice_models_present", lambda: False)
    start = time.perf_counter()
    with pytest.raises(SpiceUnavailableError, match="stanford-corenlp-3.6.0.jar"):
        caption_scores(TINY_PREDICTIONS, TINY_REFERENCES, use_java=True, spice=True)
    assert time.perf_counter() - start < 1.0


def test_spice_without_java_fails():
    with pytest.raises(SpiceUnavailableError, match="needs Java"):
        caption_scores(TINY_PREDICTIONS, TINY_REFERENCES, use_java=False, spice=True)


def test_spice_models_check_reports_a_bool():
    assert isinstance(captioning.spice_models_present(), bool)


def test_missing_pycocoevalcap_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap.cider.cider", None)
    with pytest.raises(ImportError, match=r"pip install vlpeft\[metrics\]"):
        python_scores(TINY_PREDICTIONS, TINY_REFERENCES, metrics=["CIDEr"])


# --- input validation --------------------------------------------------------------------------------------------


def test_input_validation():
    with pytest.raises(ValueError, match="same image ids"):
        caption_scores({1: "a"}, {2: ["a"]}, use_java=False)
    with pytest.raises(ValueError, match="non-empty list"):
        caption_scores({1: "a"}, {1: []}, use_java=False)
    with pytest.raises(ValueError, match="non-empty list"):
        caption_scores({1: "a"}, {1: "a"}, use_java=False)
    with pytest.raises(TypeError, match="one str caption"):
        caption_scores({1: ["a"]}, {1: ["a"]}, use_java=False)
    with pytest.raises(ValueError, match="unknown caption metric"):
        caption_scores({1: "a"}, {1: ["a"]}, use_java=False, metrics=["SPICE"])
    with pytest.raises(ValueError, match="empty"):
        caption_scores({}, {}, use_java=False)
