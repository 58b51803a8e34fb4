"""Entailment (SNLI-VE) accuracy: overall, per gold class, label checking."""

from __future__ import annotations

import pytest

from vlpeft.metrics import PADAPTER_LABEL_WORDS, entailment_accuracy


def test_overall_and_per_class_accuracy():
    gold = ["entailment", "entailment", "neutral", "contradiction", "contradiction", "contradiction"]
    pred = ["entailment", "neutral", "neutral", "contradiction", "entailment", "contradiction"]
    score = entailment_accuracy(pred, gold)
    assert score.num_examples == 6
    assert score.overall == pytest.approx(100 * 4 / 6)
    assert score.per_class == pytest.approx({"entailment": 50.0, "neutral": 100.0, "contradiction": 100 * 2 / 3})
    assert score.support == {"entailment": 2, "neutral": 1, "contradiction": 3}


def test_absent_class_has_no_accuracy():
    score = entailment_accuracy(["neutral", "neutral"], ["neutral", "entailment"])
    assert score.per_class["contradiction"] is None
    assert score.support["contradiction"] == 0
    assert score.overall == 50.0


def test_mappings_by_example_id():
    score = entailment_accuracy({"a": "neutral", "b": "entailment"}, {"b": "entailment", "a": "contradiction"})
    assert score.overall == 50.0
    assert score.per_class["entailment"] == 100.0 and score.per_class["contradiction"] == 0.0


def test_label_map_for_padapter_label_words():
    score = entailment_accuracy(["Correct", "Ambiguous", "Incorrect"], ["entailment", "neutral", "entailment"],
                                label_map=PADAPTER_LABEL_WORDS)
    assert score.overall == pytest.approx(100 * 2 / 3)
    assert score.per_class["entailment"] == 50.0


def test_unknown_labels_raise_with_the_label_named():
    with pytest.raises(ValueError, match=r"unknown predicted label 'Entailment' for example 0"):
        entailment_accuracy(["Entailment"], ["entailment"])
    with pytest.raises(ValueError, match=r"unknown gold label 'yes'"):
        entailment_accuracy(["neutral"], ["yes"])
    with pytest.raises(ValueError, match="Correct"):  # without label_map the label words are rejected
        entailment_accuracy(["Correct"], ["entailment"])
    with pytest.raises(ValueError, match="label_map maps to unknown labels"):
        entailment_accuracy(["x"], ["neutral"], label_map={"x": "maybe"})


def test_shape_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        entailment_accuracy(["neutral", "neutral"], ["neutral"])
    with pytest.raises(ValueError, match="same ids"):
        entailment_accuracy({1: "neutral"}, {2: "neutral"})
    with pytest.raises(TypeError, match="both be mappings"):
        entailment_accuracy({1: "neutral"}, ["neutral"])
    with pytest.raises(ValueError, match="no examples"):
        entailment_accuracy([], [])
