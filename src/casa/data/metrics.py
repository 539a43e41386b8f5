"""Answer metrics of the synthetic tasks (and of JSONL data that names one).

- `exact`: exact match after normalisation (case, surrounding space and
  punctuation, inner whitespace runs).
- `anls`: DocVQA's Average Normalised Levenshtein Similarity, 0 below a
  similarity of 0.5.
- `relaxed`: ChartQA's relaxed accuracy: numbers within 5 % of the answer
  count as right; non-numbers need an exact match.
"""

from __future__ import annotations

import re

METRICS = ("exact", "anls", "relaxed")


def normalize(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().lower()).strip(" .,;:!?\"'")


def exact(pred: str, gold: str) -> float:
    return float(normalize(pred) == normalize(gold))


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(pred: str, gold: str, threshold: float = 0.5) -> float:
    p, g = normalize(pred), normalize(gold)
    if not p and not g:
        return 1.0
    sim = 1.0 - levenshtein(p, g) / max(len(p), len(g))
    return sim if sim >= threshold else 0.0


def _number(s: str) -> float | None:
    try:
        return float(normalize(s).rstrip("%").replace(",", ""))
    except ValueError:
        return None


def relaxed(pred: str, gold: str, tolerance: float = 0.05) -> float:
    p, g = _number(pred), _number(gold)
    if p is None or g is None:
        return exact(pred, gold)
    if g == 0:
        return float(p == 0)
    return float(abs(p - g) / abs(g) <= tolerance)


def score(metric: str, pred: str, gold: str) -> float:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    return {"exact": exact, "anls": anls, "relaxed": relaxed}[metric](pred, gold)
