"""How every benchmark hands its result over: one JSON file, written
atomically (an interrupted run never leaves a half-written report, and the
previous one stays until the new one is complete), then an optional plot.

Every report carries `provenance`: the commit it was measured at (with
`dirty` when the tree had changes), the machine (CPU model, cores, memory,
OS), the Python and torch versions and the date, so a figure quoted from it
can name both. Reading them costs a `git` call and a few small files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from casa.files import atomic_file

__all__ = ["provenance", "write_experiment", "write_report"]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def provenance() -> dict:
    """Where and when a measurement is made: commit, machine, versions, date."""
    import torch

    status = _git("status", "--porcelain", "--untracked-files=no")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"commit": _git("rev-parse", "--short", "HEAD"), "dirty": bool(status) if status is not None else None,
            "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": _memory_gib(), "gpu": gpu,
                        "os": f"{platform.system()} {platform.release()}"},
            "python": platform.python_version(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_report(report: dict, json_path: str | Path | None, *, plot: Callable | None = None,
                 plot_path: str | Path | None = None, indent: int = 2, quiet: bool = False) -> None:
    """Write `report`, with its `provenance` added, as JSON at `json_path` (if given), then
    `plot(report, plot_path)` (if given)."""
    if json_path:
        report.setdefault("provenance", provenance())  # in the caller's dict too: what it returns says the same
        with atomic_file(Path(json_path)) as f:
            f.write(json.dumps(report, indent=indent, default=str) + "\n")
        if not quiet:
            print(f"wrote {json_path}")
    if plot is not None and plot_path:
        plot(report, plot_path)


def write_experiment(results: dict, out: str | Path, name: str, *, plot: Callable,
                     section: Callable[[dict], str]) -> None:
    """A study experiment's files in `out`: `NAME.json` (with provenance, `write_report`), `NAME.png`
    (`plot(results, path)`) and `NAME.md` (`section(results)`), each written atomically."""
    out = Path(out)
    write_report(results, out / f"{name}.json", plot=plot, plot_path=out / f"{name}.png", quiet=True)
    with atomic_file(out / f"{name}.md") as f:
        f.write(section(results))
