"""Training run directories, as their readers (eval, caption, demo, trainer) see them.

Layout: `RUN/checkpoints/step_000100/` is a casa model directory
(`config.json`, weights, tokenizer) plus the trainer's state file. Only
`step_*` directories holding both count as checkpoints, so a half-written
one (the trainer writes under a temporary name and renames) is never found.

This module reads that layout; `casa.training.checkpoint` writes it.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["STATE", "checkpoint_dir", "latest_checkpoint", "list_checkpoints", "resolve_model_dir"]

STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, directory)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE).is_file() and (p / "config.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_model_dir(path) -> Path:
    """A model directory as given, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{str(path)!r} is not a casa model directory (no config.json) nor a training run with checkpoints")
    return latest
