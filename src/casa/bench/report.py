"""How every benchmark hands its result over: one JSON file, written
atomically (an interrupted run never leaves a half-written report, and the
previous one stays until the new one is complete), then an optional plot."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from casa.files import atomic_file

__all__ = ["write_report"]


def write_report(report: dict, json_path: str | Path | None, *, plot: Callable | None = None,
                 plot_path: str | Path | None = None, indent: int = 2, quiet: bool = False) -> None:
    """Write `report` as JSON at `json_path` (if given), then `plot(report, plot_path)` (if given)."""
    if json_path:
        with atomic_file(Path(json_path)) as f:
            f.write(json.dumps(report, indent=indent, default=str) + "\n")
        if not quiet:
            print(f"wrote {json_path}")
    if plot is not None and plot_path:
        plot(report, plot_path)
