"""Parsing of KEY=VALUE command-line items (`--set`, `--difficulty`)."""

from __future__ import annotations


def key_values(items) -> dict:
    import json

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: expected key=value")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out
