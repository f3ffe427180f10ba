"""VQA metrics, worked by hand from the reference evaluation's rules."""

import pytest

from assistant.vqa.metrics import (exact_match, normalize_answer, pope_scores, process_punctuation, score_items,
                               vqa_accuracy)


@pytest.mark.parametrize("raw,normal", [
    ("Two", "2"), ("none", "0"), ("ten", "10"),                     # number words -> digits
    ("a dog", "dog"), ("The Red Ball", "red ball"), ("an apple", "apple"),  # articles dropped, lower case
    ("dont", "don't"), ("isnt", "isn't"), ("whats", "what's"),      # contractions restored
    ("yes.", "yes"), ("3.5", "3.5"), ("no!", "no"),                  # periods not before a digit; '!' gone
    ("1,000", "1000"),                                               # digit,digit: punctuation removed, not spaced
    ("hello,world", "hello world"),                                  # otherwise a bare comma becomes a space
    ("red , blue", "red blue"),                                      # punctuation next to a space is removed
    ("  left\n", "left"),
])
def test_normalisation_rules(raw, normal):
    assert normalize_answer(raw) == normal


def test_punctuation_rule_depends_on_spaces():
    assert process_punctuation("t-shirt") == "t shirt"
    assert process_punctuation("t- shirt") == "t shirt"


def test_ten_answer_leave_one_out_average():
    answers = ["yes"] * 3 + ["no"] * 7
    # Dropping a "yes" leaves 2 matches (2/3); dropping a "no" leaves 3 (1): (3*2/3 + 7*1)/10.
    assert vqa_accuracy("yes", answers) == pytest.approx(0.9)
    assert vqa_accuracy("no", answers) == pytest.approx(1.0)
    two = ["cat", "cat"] + ["dog"] * 8
    assert vqa_accuracy("cat", two) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("Cat.", two) == pytest.approx(0.6)   # the prediction is normalised
    assert vqa_accuracy("bird", two) == 0.0


def test_single_reference_answer_is_normalised_exact_match():
    assert vqa_accuracy("Two.", ["2"]) == 1.0
    assert vqa_accuracy("three", ["2"]) == 0.0
    assert exact_match("A circle", ["circle", "round"]) == 1.0


def test_pope_scores():
    preds = ["Yes", "no", "yes", "no", "maybe"]
    labels = ["yes", "yes", "no", "no", "yes"]
    s = pope_scores(preds, labels)
    # tp=1 (0), fn=2 (1, and unparsed 4), fp=1 (2), tn=1 (3)
    assert s["count"] == 5 and s["unparsed"] == 1
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx(0.4) and s["accuracy"] == pytest.approx(0.4)


def test_breakdown_by_type():
    items = [{"prediction": "red", "answers": ["red"], "question_type": "colour"},
             {"prediction": "blue", "answers": ["red"], "question_type": "colour"},
             {"prediction": "yes", "answers": ["yes"], "question_type": "exist"}]
    m = score_items(items)
    assert m["vqa_accuracy"] == pytest.approx(200 / 3)
    assert m["by_question_type"]["colour"]["vqa_accuracy"] == 50.0
    assert m["yes_no"]["count"] == 1
