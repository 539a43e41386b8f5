"""Answer metrics: the one home of answer normalisation, edit distance, ANLS
and number parsing, for the synthetic tasks and the standard benchmarks alike.

- `exact`: exact match after `normalize(..., strip_punctuation=True)`.
- `anls`: Average Normalised Levenshtein Similarity (DocVQA / InfographicVQA;
  Biten et al. 2019): per question, the best over the gold answers of
  `1 - NL` when the normalised distance `NL = lev(a, p) / max(|a|, |p|)` is
  below tau = 0.5, else 0.
- `relaxed_correctness` (ChartQA; Methani et al. 2020, as implemented in
  pix2struct and lmms-eval): right if prediction and target both parse as
  numbers (`parse_number`) and differ by at most 5 % of the target, otherwise
  if the strings are equal ignoring case.
- `score(metric, prediction, gold)`: the metric a synthetic task or a JSONL
  sample names (`METRICS`), on answers trimmed of surrounding punctuation.

Design decisions:
- One normalisation rule (`normalize`): lower case, surrounding space
  removed, inner whitespace runs collapsed to one space; optionally,
  surrounding punctuation removed too (a model that ends its answer with a
  full stop is not wrong). Every metric here goes through it.
- ANLS follows the published definition: at `NL = 0.5` exactly the score is
  0 (some scripts compare the similarity with `>= 0.5` and give 0.5 there).
- Numbers follow the ChartQA reference: `"12%"` is 0.12, `"1,000"` is not a
  number (a string comparison decides), and a target of 0 falls back to the
  string comparison (the reference's `and target_float`).
- The benchmark-specific rules (VQA accuracy, multiple-choice letters, GQA's
  punctuation-free match) live in `casa.eval.stdbench.metrics`, next to the
  benchmarks that define them.
"""

from __future__ import annotations

__all__ = ["METRICS", "anls", "exact", "levenshtein", "normalize", "parse_number", "relaxed_correctness", "score"]

METRICS = ("exact", "anls", "relaxed")
PUNCTUATION = " .,;:!?\"'"  # trimmed around an answer by `normalize(..., strip_punctuation=True)`


def normalize(text: str, *, strip_punctuation: bool = False) -> str:
    """Lower case, inner whitespace runs collapsed, surrounding space (and punctuation) removed."""
    text = " ".join(text.lower().split())
    return text.strip(PUNCTUATION) if strip_punctuation else text


def exact(prediction: str, gold: str) -> float:
    """1.0 when the answers are equal up to case, spacing and surrounding punctuation."""
    return float(normalize(prediction, strip_punctuation=True) == normalize(gold, strip_punctuation=True))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between two strings."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers, tau: float = 0.5) -> float:
    """ANLS of one question: the best over `answers` (a string or a list) of `1 - NL` if `NL < tau`, else 0."""
    if isinstance(answers, str):
        answers = [answers]
    p = normalize(prediction)
    best = 0.0
    for a in map(normalize, answers):
        if not a and not p:
            return 1.0
        nl = levenshtein(a, p) / max(len(a), len(p))
        best = max(best, 1.0 - nl if nl < tau else 0.0)
    return best


def parse_number(text: str) -> float | None:
    """`text` as a number, ChartQA's way: `"12%"` -> 0.12, `"3.5"` -> 3.5; None if it is not one."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> float:
    """1.0 for numbers within `max_relative_change` of a non-zero target, else for equal strings (any case)."""
    p, t = parse_number(prediction), parse_number(target)
    if p is not None and t:
        return float(abs(p - t) / abs(t) <= max_relative_change)
    return float(prediction.lower() == target.lower())


def score(metric: str, prediction: str, gold: str) -> float:
    """The score in [0, 1] of `prediction` against `gold` under `metric` (one of `METRICS`)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if metric == "exact":
        return exact(prediction, gold)
    p, g = normalize(prediction, strip_punctuation=True), normalize(gold, strip_punctuation=True)
    return anls(p, g) if metric == "anls" else relaxed_correctness(p, g)
