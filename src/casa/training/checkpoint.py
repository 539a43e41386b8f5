"""Training checkpoints: a casa model directory plus the trainer's state.

Layout: `RUN/checkpoints/step_000100/` holds `config.json`,
`model.safetensors` and the tokenizer (so it is a model directory that
`from_pretrained` and `casa eval` read) and `trainer_state.pt` (optimizer,
scheduler, RNG states of every rank, data position, step, loss history,
train config).

Design decisions:
- Atomic: a checkpoint is written in full under a dot-prefixed temporary name
  in the same directory and renamed into place; only `step_*` directories
  holding both `config.json` and `trainer_state.pt` count, so a crash
  or a kill mid-write never leaves a half-written checkpoint as the latest.
  Leftover temporaries are removed by the next save.
- Keep-last-k: older checkpoints are deleted only after the new one is in place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from casa.pretrained.directory import save_pretrained
from casa.pretrained.runs import (
    STATE,
    checkpoint_dir,
    list_checkpoints,
)


def save_checkpoint(run_dir, step: int, model, state: dict, *, tokenizer=None, processor=None, keep_last: int = 3,
                    extra: dict | None = None) -> Path:
    """Write checkpoint `step` atomically, then prune to the `keep_last` newest."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for p in root.glob(".tmp-*"):  # leftovers of a crashed save
        shutil.rmtree(p, ignore_errors=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        save_pretrained(model, tmp, tokenizer=tokenizer, processor=processor, extra=extra)
        torch.save(state, tmp / STATE)
        _fsync_dir(tmp)
        if final.exists():
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for _, p in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def load_state(ckpt) -> dict:
    file = Path(ckpt) / STATE
    if not file.is_file():
        raise FileNotFoundError(f"{str(ckpt)!r}: no {STATE} (not a training checkpoint)")
    return torch.load(file, map_location="cpu", weights_only=False)


def _fsync_dir(path: Path) -> None:
    for f in [*path.iterdir(), path] if path.is_dir() else [path]:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
