"""Command-line values: KEY=VALUE items (`--set`, `--difficulty`) and the
argparse types that refuse out-of-range numbers before any work starts.

Design decisions:
- A bad value is refused by argparse itself (exit code 2, a one-line
  message naming the flag and the value), never deep inside a command.
- Non-finite floats (nan, inf) are refused wherever a number is expected.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["TASK_NAMES", "key_values", "non_negative_int", "positive_float", "positive_int", "probability"]

# the synthetic tasks, for help texts (`casa.data.tasks.TASKS` loads torch; a test keeps the two equal)
TASK_NAMES = ("color", "count", "position", "compare", "docvqa", "chartqa", "video", "motion", "digits", "bars",
              "table", "match", "recall")


def key_values(items) -> dict:
    """["a=1", "b=x"] -> {"a": 1, "b": "x"} (values parsed by `casa.config.parse_value`)."""
    from casa.config import parse_value

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: expected key=value")
        out[key] = parse_value(value)
    return out


def _number(kind, text: str, test, expected: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
    if (isinstance(value, float) and not math.isfinite(value)) or not test(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {expected}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number > 0."""
    return _number(int, text, lambda v: v > 0, "a whole number > 0")


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    return _number(int, text, lambda v: v >= 0, "a whole number >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(float, text, lambda v: v > 0, "a finite number > 0")


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    return _number(float, text, lambda v: 0 < v <= 1, "a number in (0, 1]")
