"""Training run directories, as their readers (eval, caption, demo, trainer) see them.

Layout: `RUN/checkpoints/step_000100/` is a casa model directory
(`config.json`, weights, tokenizer) plus the trainer's state:
`trainer_state.json` (everything but tensors) and
`trainer_state.safetensors` (optimizer moments, torch RNG states).

This module reads that layout; `casa.training.checkpoint` writes it.

Design decisions:
- Only `step_*` directories holding both `config.json` and a trainer state
  count as checkpoints, so a half-written one (the trainer writes under a
  temporary `.tmp-*` name and renames) is never found.
- A checkpoint that is complete by name but whose files are damaged (cut
  short by a full disk, zeroed by a crash of the filesystem) is skipped by
  `latest_checkpoint`, which falls back to the previous valid one and says so
  on stderr: resume, `casa eval RUN` and `casa caption` keep working. The
  check reads headers only (config JSON, safetensors headers, which
  safetensors checks against the file size), never the tensors.
- Checkpoints of older casa versions hold `trainer_state.pt`, a pickle; they
  still count (their model is readable), and `casa.training.checkpoint`
  reads their state with torch's restricted (`weights_only`) unpickler only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from casa.files import read_json
from casa.pretrained.model_dir import read_config
from casa.weights import open_safetensors, weight_files

__all__ = ["LEGACY_STATE", "STATE", "STATE_TENSORS", "check_checkpoint", "checkpoint_dir", "latest_checkpoint",
           "list_checkpoints", "resolve_model_dir"]

STATE = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir) -> Path:
    """`RUN/checkpoints`, where a run's checkpoints live."""
    return Path(run_dir) / "checkpoints"


def _has_state(p: Path) -> bool:
    return (p / STATE).is_file() or (p / LEGACY_STATE).is_file()


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, directory); their files are not read."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and _has_state(p) and (p / "config.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def check_checkpoint(path) -> None:
    """Read the headers of every file of checkpoint `path`: DamagedFileError (or FileNotFoundError /
    ValueError) naming the first file that is damaged or missing."""
    path = Path(path)
    read_config(path)
    for file in sorted(set(weight_files(path).values())):
        with open_safetensors(file):
            pass
    if (path / STATE).is_file() or not (path / LEGACY_STATE).is_file():
        read_json(path / STATE)
        with open_safetensors(path / STATE_TENSORS):
            pass


def latest_checkpoint(run_dir) -> Path | None:
    """The newest checkpoint of a run whose files are readable (None if the run has none).

    Damaged newer checkpoints are skipped with a warning on stderr; if every
    checkpoint is damaged, the newest one's error is raised.
    """
    found = list_checkpoints(run_dir)
    first_error = None
    for _, path in reversed(found):
        try:
            check_checkpoint(path)
        except (ValueError, FileNotFoundError) as e:
            first_error = first_error or e
            print(f"casa: warning: skipping checkpoint {str(path)!r}: {e}; falling back to the previous one",
                  file=sys.stderr)
            continue
        return path
    if first_error is not None:
        raise ValueError(f"run {str(run_dir)!r} has no readable checkpoint; the newest: {first_error}") from None
    return None


def resolve_model_dir(path) -> Path:
    """A model directory as given, or the latest readable checkpoint of a run directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{str(path)!r} is not a casa model directory (no config.json) "
                                "nor a training run with checkpoints")
    return latest
