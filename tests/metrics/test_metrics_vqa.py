"""Official VQA accuracy (GT-Vision-Lab/VQA vqaEval.py at a013f00): normalisation rules and scoring, by hand."""

from __future__ import annotations

import pytest

from vlpeft.metrics import (
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_label_accuracy,
    vqa_label_score,
    vqa_soft_score,
)
from vlpeft.metrics.vqa_normalize import VQA_CONTRACTIONS

# --- processPunctuation ------------------------------------------------------------------------------------------


def test_digit_comma_digit_deletes_every_punctuation_mark():
    assert process_punctuation("1,500-2,000") == "15002000"
    assert normalize_answer("1,500-2,000") == "15002000"
    # Without a digit-comma-digit the same marks become spaces.
    assert process_punctuation("1-2") == "1 2"
    # The digit-comma-digit anywhere deletes brackets elsewhere too.
    assert process_punctuation("1,000 (approx)") == "1000 approx"


def test_slash_becomes_space_then_article_is_dropped():
    assert process_punctuation("a/c") == "a c"
    assert normalize_answer("a/c") == "c"


def test_hyphens_deleted_everywhere_if_any_hyphen_space_occurs():
    assert process_punctuation("t-shirt") == "t shirt"
    assert process_punctuation("x - y-z") == "x  yz"
    assert normalize_answer("x - y-z") == "x yz"
    assert process_punctuation("x -y-z") == "x yz"  # " -" triggers deletion as well


def test_mark_followed_by_space_is_deleted_not_spaced():
    assert process_punctuation("what ?") == "what "
    assert process_punctuation("what?") == "what "
    # " (" occurs, so "(" is deleted; neither ") " nor " )" occurs, so ")" becomes a space.
    assert process_punctuation("red (dark)") == "red dark "
    assert normalize_answer("red (dark)") == "red dark"


def test_periods_not_followed_by_digit_are_deleted_including_after_digits():
    assert process_punctuation("yes.") == "yes"
    assert process_punctuation("2.5") == "2.5"
    assert process_punctuation("5.") == "5"  # the mistyped look-behind does not protect "digit ."
    assert process_punctuation("st. louis") == "st louis"


def test_at_most_32_periods_are_deleted():
    assert process_punctuation("yes" + "." * 32) == "yes"
    assert process_punctuation("yes" + "." * 33) == "yes."
    assert normalize_answer("yes" + "." * 33) == "yes."


def test_colon_and_apostrophe_survive():
    assert process_punctuation("3:30") == "3:30"
    assert normalize_answer("man's") == "man's"


# --- processDigitArticle -----------------------------------------------------------------------------------------


def test_number_words_become_digits():
    assert process_digit_article("Two dogs") == "2 dogs"
    assert process_digit_article("none zero one ten") == "0 0 1 10"
    assert process_digit_article("eleven") == "eleven"  # only none/zero..ten are mapped


def test_articles_are_dropped_after_lowercasing():
    assert process_digit_article("The red one") == "red 1"
    assert process_digit_article("an apple A day") == "apple day"
    assert process_digit_article("the") == ""


def test_contractions_table_including_its_quirks():
    assert process_digit_article("dont") == "don't"
    assert process_digit_article("isnt it") == "isn't it"
    assert process_digit_article("somebody'd") == "somebodyd"  # maps "backwards"
    assert process_digit_article("let's") == "let's"
    # Capitalised keys (Im, Ive, Id've, I'dve) can never match after lowercasing.
    for key in ("Im", "Ive", "Id've", "I'dve"):
        assert key in VQA_CONTRACTIONS
        assert process_digit_article(key) == key.lower()


def test_whitespace_is_collapsed_and_newlines_tabs_handled():
    assert normalize_answer("\tyes \n") == "yes"
    assert process_digit_article("  red   car ") == "red car"


# --- per-question scoring ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("count, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_leave_one_out_closed_form(count, expected):
    others = ["red", "blue", "green", "pink", "gray", "black", "white", "brown", "orange", "purple"]
    gts = ["yes"] * count + others[: 10 - count]
    assert vqa_soft_score("yes", gts) == pytest.approx(expected, abs=1e-12)


def test_leave_one_out_differs_from_simple_min_c_over_3():
    # One matching annotator: 9 of the 10 leave-one-out subsets contain it -> 0.9 * 1/3 = 0.3, not 1/3.
    gts = ["cat"] + ["dog"] * 9
    assert vqa_soft_score("cat", gts) == pytest.approx(0.3)
    assert vqa_soft_score("dog", gts) == pytest.approx(1.0)


def test_all_identical_ground_truth_means_no_normalisation_on_either_side():
    ten_yes = ["yes"] * 10
    assert vqa_soft_score("yes", ten_yes) == 1.0
    assert vqa_soft_score("Yes", ten_yes) == 0.0
    assert vqa_soft_score("yes.", ten_yes) == 0.0
    assert vqa_soft_score("2", ["two"] * 10) == 0.0
    # Whitespace handling still applies, and is done before the identity check.
    assert vqa_soft_score(" yes\n", ten_yes) == 1.0
    assert vqa_soft_score("Yes", ["yes"] * 5 + ["yes\t"] * 5) == 0.0


def test_mixed_ground_truth_normalises_both_sides():
    gts = ["yes"] * 9 + ["no"]
    assert vqa_soft_score("Yes.", gts) == pytest.approx(1.0)
    assert vqa_soft_score("2", ["two"] * 4 + ["three"] * 6) == pytest.approx(1.0)
    assert vqa_soft_score("the cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(0.6)


def test_legacy_2017_behaviour():
    ten_yes = ["yes"] * 10
    # The prediction is always normalised in 2017 ...
    assert vqa_soft_score("Yes", ten_yes, legacy_2017=True) == 1.0
    assert vqa_soft_score("Yes", ten_yes) == 0.0
    # ... while ground truth only gets punctuation processing (no lowercasing, no number words).
    gts = ["Yes"] * 5 + ["no"] * 5
    assert vqa_soft_score("yes", gts) == pytest.approx(1.0)
    assert vqa_soft_score("yes", gts, legacy_2017=True) == 0.0
    assert vqa_soft_score("2", ["two"] * 4 + ["three"] * 6, legacy_2017=True) == 0.0


def test_soft_score_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        vqa_soft_score("yes", [])
    with pytest.raises(TypeError, match="single string"):
        vqa_soft_score("yes", "yes")
    with pytest.raises(TypeError, match="prediction"):
        vqa_soft_score(1, ["1"] * 10)


# --- corpus accuracy ---------------------------------------------------------------------------------------------


def _annotation(qid, answers, answer_type=None, question_type=None):
    record = {"question_id": qid, "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]}
    if answer_type is not None:
        record["answer_type"] = answer_type
    if question_type is not None:
        record["question_type"] = question_type
    return record


@pytest.fixture()
def annotations():
    return [
        _annotation(1, ["yes"] * 10, "yes/no", "is the"),  # pred "yes" -> 1.0
        _annotation(2, ["2"] + ["3"] * 9, "number", "how many"),  # pred "two" -> 0.3
        _annotation(3, ["red"] * 10, "other", "what color"),  # pred "blue" -> 0.0
        _annotation(4, ["no"] * 8 + ["yes"] * 2, "yes/no", "is the"),  # pred "yes" -> 0.6
    ]


def test_corpus_accuracy_overall_and_per_type(annotations):
    predictions = {1: "yes", 2: "two", 3: "blue", 4: "yes"}
    score = vqa_accuracy(predictions, annotations)
    assert score.num_questions == 4
    assert score.per_question[1] == pytest.approx(1.0)
    assert score.per_question[2] == pytest.approx(0.3)
    assert score.per_question[3] == 0.0
    assert score.per_question[4] == pytest.approx(0.6)
    assert score.overall == 47.5  # 100 * (1 + 0.3 + 0 + 0.6) / 4
    assert score.per_answer_type == {"yes/no": 80.0, "number": 30.0, "other": 0.0}
    assert score.per_question_type == {"is the": 80.0, "how many": 30.0, "what color": 0.0}


def test_corpus_accuracy_rounds_to_two_decimals(annotations):
    score = vqa_accuracy({1: "yes", 2: "two", 3: "blue"}, annotations[:3])
    assert score.overall == 43.33  # 100 * 1.3 / 3 = 43.333...


def test_predictions_as_official_result_records_and_subset(annotations):
    records = [{"question_id": q, "answer": a} for q, a in [(1, "yes"), (2, "two"), (3, "blue"), (4, "yes")]]
    assert vqa_accuracy(records, annotations).overall == 47.5
    subset = vqa_accuracy({1: "yes", 3: "blue"}, annotations, question_ids=[1, 3])
    assert subset.overall == 50.0 and subset.num_questions == 2


def test_types_are_optional_but_must_be_consistent():
    plain = [_annotation(1, ["a cat"] * 3 + ["dog"] * 7), _annotation(2, ["no"] * 10)]
    score = vqa_accuracy({1: "cat", 2: "no"}, plain)
    assert score.per_answer_type == {} and score.per_question_type == {}
    assert score.overall == 95.0  # (0.9 + 1) / 2
    mixed = [_annotation(1, ["no"] * 10, "yes/no"), _annotation(2, ["no"] * 10)]
    with pytest.raises(ValueError, match="answer_type"):
        vqa_accuracy({1: "no", 2: "no"}, mixed)


def test_plain_string_answers_are_accepted():
    score = vqa_accuracy({7: "Yes"}, [{"question_id": 7, "answers": ["yes"] * 9 + ["no"]}])
    assert score.overall == 100.0


def test_id_mismatch_errors_name_the_ids(annotations):
    with pytest.raises(ValueError, match="annotated but not predicted: 4"):
        vqa_accuracy({1: "yes", 2: "2", 3: "red"}, annotations)
    with pytest.raises(ValueError, match="int on one side and str"):
        vqa_accuracy({"1": "yes", "2": "2", "3": "red", "4": "no"}, annotations)
    with pytest.raises(ValueError, match="more than once"):
        vqa_accuracy([{"question_id": 1, "answer": "yes"}] * 2, annotations[:1])
    with pytest.raises(ValueError, match="requested but not predicted"):
        vqa_accuracy({1: "yes"}, annotations, question_ids=[1, 2])


def test_malformed_records_raise(annotations):
    with pytest.raises(ValueError, match="'question_id' and 'answer'"):
        vqa_accuracy([{"qid": 1, "answer": "yes"}], annotations[:1])
    with pytest.raises(ValueError, match="non-empty list 'answers'"):
        vqa_accuracy({1: "yes"}, [{"question_id": 1, "answers": []}])
    with pytest.raises(TypeError, match="must be a str"):
        vqa_accuracy({1: None}, annotations[:1])


# --- VL-T5 style label scoring -----------------------------------------------------------------------------------


def test_label_score_looks_up_the_exact_answer():
    label = {"yes": 1.0, "no": 0.3}
    assert vqa_label_score("yes", label) == 1.0
    assert vqa_label_score("no", label) == 0.3
    assert vqa_label_score("Yes", label) == 0.0  # no normalisation, like VL-T5's evaluator
    assert vqa_label_score("maybe", label) == 0.0


def test_label_accuracy_is_mean_in_percent():
    labels = {1: {"yes": 1.0}, 2: {"2": 0.6, "3": 1.0}, 3: {}}
    assert vqa_label_accuracy({1: "yes", 2: "2", 3: "red"}, labels) == pytest.approx(100 * 1.6 / 3)
    with pytest.raises(ValueError, match="without a label"):
        vqa_label_accuracy({4: "yes"}, labels)
