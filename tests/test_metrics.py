"""casa.data.metrics: the one home of answer normalisation, Levenshtein, ANLS and
number parsing, used by the synthetic tasks and the standard benchmarks."""

import pytest

from casa.data.metrics import (
    METRICS,
    anls,
    levenshtein,
    normalize,
    parse_number,
    relaxed_correctness,
    score,
)
from casa.eval.stdbench import BENCHMARKS
from casa.eval.stdbench.datasets import Item


# ----------------------------------------------------------------------------- the shared rules
def test_normalize():
    assert normalize("  Red \t Car\n") == "red car"
    assert normalize(" Red.  Car. ") == "red. car."
    assert normalize(" Red.  Car. ", strip_punctuation=True) == "red. car"  # only around the answer
    assert normalize('"Left!"', strip_punctuation=True) == "left"


@pytest.mark.parametrize("a,b,distance", [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("ab", "ba", 2)])
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance == levenshtein(b, a)


@pytest.mark.parametrize("text,number", [("12", 12.0), ("3.5", 3.5), ("-2", -2.0), ("12%", 0.12),
                                         ("1,000", None), ("twelve", None), ("", None)])
def test_parse_number(text, number):
    assert parse_number(text) == number


@pytest.mark.parametrize("pred,target,value", [
    ("12", "12", 1), ("12.6", "12", 1),  # |12.6 - 12| / 12 = 5 %: still right
    ("12.7", "12", 0), ("105", "100", 1), ("94.9", "100", 0),
    ("12%", "0.12", 1),  # percentages parse as fractions
    ("Yes", "yes", 1), ("No", "yes", 0),  # non-numbers: exact, case-insensitive
    ("0", "0", 1), ("0.0", "0", 0),  # a 0 target compares strings (the reference's `and target_float`)
    ("1,000", "1000", 0),  # "1,000" is not a float: string comparison
])
def test_relaxed_correctness(pred, target, value):
    assert relaxed_correctness(pred, target) == value


@pytest.mark.parametrize("pred,answers,value", [
    ("hello", ["hello"], 1.0),
    ("helo", ["hello"], 0.8),  # lev 1 / 5
    (" Hello  ", ["hello"], 1.0),  # case and surrounding space do not count
    ("cat", ["dog"], 0.0),
    ("2019", ["2018", "the year 2019"], 0.75),  # best gold: lev 1 / 4; the other is 9 / 13 > 0.5 -> 0
    ("abcd", ["abxy"], 0.0),  # NL = 0.5 exactly is not below tau: 0
    ("abcde", ["abxye"], pytest.approx(0.6)),  # NL = 0.4
    ("", [""], 1.0),
    ("abc", "abd", pytest.approx(2 / 3)),  # one gold answer as a string
])
def test_anls(pred, answers, value):
    assert anls(pred, answers) == value


def test_anls_is_the_mean_over_questions():
    rows = [("hello", ["hello"]), ("helo", ["hello"]), ("cat", ["dog"])]
    assert sum(anls(p, a) for p, a in rows) / 3 == pytest.approx(0.6)


# ----------------------------------------------------------------------------- the synthetic tasks' metrics
@pytest.mark.parametrize("metric,pred,gold,value", [
    ("exact", " Red. ", "red", 1.0), ("exact", "blue", "red", 0.0), ("exact", "red car", "red  car", 1.0),
    ("anls", "AB12", "AB12", 1.0), ("anls", "AB13", "AB12", 0.75), ("anls", "XY", "AB12", 0.0),
    ("anls", "ab12.", "AB12", 1.0),  # case and a closing full stop do not count
    ("anls", "AB", "ABCD", 0.0),  # NL = 0.5: the benchmark's rule, 0
    ("relaxed", "104", "100", 1.0), ("relaxed", "106", "100", 0.0), ("relaxed", "5.", "5", 1.0),
    ("relaxed", "five", "5", 0.0),
])
def test_score(metric, pred, gold, value):
    assert metric in METRICS
    assert score(metric, pred, gold) == pytest.approx(value)


def test_score_refuses_an_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score("bleu", "a", "a")


def test_benchmarks_and_synthetic_tasks_agree():
    """DocVQA and ChartQA score with the same rule as the synthetic docvqa / chartqa tasks."""
    doc = Item("1", "q", ["AB12"], None)
    chart = Item("2", "q", ["100"], None)
    for pred in ("AB12", "ab13", "AB1", "XY", "ab12."):
        assert BENCHMARKS["docvqa"].score(pred, doc) == score("anls", pred, "AB12")
    for pred in ("104", "106", "100.", "abc"):
        assert BENCHMARKS["chartqa"].score(pred, chart) == score("relaxed", pred, "100")
