"""Training checkpoints: a casa model directory plus the trainer's state.

Layout (`casa.pretrained.runs` reads it): `RUN/checkpoints/step_000100/`
holds `config.json`, the weights and the tokenizer (so it is a model
directory that `from_pretrained` and `casa eval` read), and the trainer state
(optimizer, scheduler, RNG states of every rank, data position, step, loss
history, train config) as `trainer_state.json` + `trainer_state.safetensors`.

Design decisions:
- No pickle: the state's tensors go to safetensors, everything else to
  JSON, each tensor replaced in the JSON by `{"__tensor__": name}`. Loading a
  received run directory therefore cannot run code. Python's and numpy's RNG
  states are stored as lists of integers. Checkpoints of older casa versions
  (`trainer_state.pt`, a pickle) are read with torch's restricted
  `weights_only` unpickler only, which refuses anything but tensors and
  plain values (numpy arrays allowed): a crafted pickle is an error, never
  run.
- Atomic (`casa.files.atomic_directory`): a checkpoint is written in full
  under a `.tmp-*` name in the same directory and renamed into place, so a
  crash, a `kill -9` or a second Ctrl-C mid-write never leaves a half-written
  checkpoint as the latest. Leftover temporaries are removed by the next save.
- Keep-last-k: older checkpoints are deleted only after the new one is in place.
- Test hook: `CASA_TEST_SAVE_PAUSE=STEP:SECONDS` sleeps in the middle of the
  save of step STEP (after the JSON state, before its tensors), so that tests
  can kill a real `casa train` while it is saving. Unset, it costs nothing.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from casa.files import DamagedFileError, atomic_directory, read_json
from casa.pretrained.directory import write_model
from casa.pretrained.runs import (
    LEGACY_STATE,
    STATE,
    STATE_TENSORS,
    checkpoint_dir,
    list_checkpoints,
)
from casa.weights import read_safetensors

__all__ = ["decode_state", "encode_state", "load_state", "save_checkpoint"]

_TENSOR = "__tensor__"


# ------------------------------------------------------------------ state <-> JSON + tensors
def encode_state(obj, tensors: dict[str, torch.Tensor], path: str = "state"):
    """`obj` with every tensor moved into `tensors` (named by its path) and replaced by `{"__tensor__": name}`.

    `obj` may nest dicts (string keys), lists, tuples (stored as lists), None,
    bool, int, float, str and tensors; anything else is a TypeError naming its path.
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR: path}
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"trainer state: {path} has non-string keys {bad[:3]}")
        return {k: encode_state(v, tensors, f"{path}/{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_state(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"trainer state: {path} is a {type(obj).__name__}, which a checkpoint does not store")


def decode_state(obj, tensors: dict[str, torch.Tensor], where: Path):
    """The inverse of `encode_state`; a missing tensor is a DamagedFileError naming `where`."""
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            if obj[_TENSOR] not in tensors:
                raise DamagedFileError(where, f"it lacks the tensor {obj[_TENSOR]!r}")
            return tensors[obj[_TENSOR]]
        return {k: decode_state(v, tensors, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_state(v, tensors, where) for v in obj]
    return obj


# ------------------------------------------------------------------ writing
def _pause_for_tests(step: int) -> None:
    hook = os.environ.get("CASA_TEST_SAVE_PAUSE")
    if hook:
        at, _, seconds = hook.partition(":")
        if int(at) == step:
            time.sleep(float(seconds))


def save_checkpoint(run_dir, step: int, model, state: dict, *, tokenizer=None, processor=None, keep_last: int = 3,
                    extra: dict | None = None) -> Path:
    """Write checkpoint `step` of `run_dir` atomically (model directory + trainer `state`), then keep the
    `keep_last` newest (0: all). Returns the checkpoint directory."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for p in root.glob(".tmp-*"):  # leftovers of a crashed or killed save
        shutil.rmtree(p, ignore_errors=True)
    final = root / f"step_{step:06d}"
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(state, tensors)
    with atomic_directory(final) as tmp:
        write_model(model, tmp, tokenizer=tokenizer, processor=processor, extra=extra)
        (tmp / STATE).write_text(json.dumps(encoded))
        _pause_for_tests(step)
        save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": "pt"})
    if keep_last > 0:
        for _, p in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    return final


# ------------------------------------------------------------------ reading
def _load_legacy(file: Path) -> dict:
    import numpy as np

    if file.stat().st_size == 0:
        raise DamagedFileError(file, "empty file")
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    # what an old casa state holds besides tensors and plain values: numpy's RNG state array
    allowed = [np.ndarray, np.dtype, core.multiarray._reconstruct]
    if hasattr(np, "dtypes"):  # numpy >= 1.25 pickles a dtype as its class
        allowed.append(np.dtypes.UInt32DType)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        asked = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it asks for {asked.group(1)}" if asked else "it holds more than tensors and plain values"
        raise ValueError(f"{str(file)!r}: refused to load this pickled trainer state: {what}, and loading it "
                         "could run code (casa reads pickles with torch's weights_only loader only)") from None
    except (RuntimeError, EOFError, OSError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
        raise DamagedFileError(file, f"cannot read it: {reason}") from None


def load_state(ckpt) -> dict:
    """The trainer state of checkpoint `ckpt` (tensors on the CPU); errors name the file."""
    ckpt = Path(ckpt)
    file = ckpt / STATE
    if not file.is_file():
        if (ckpt / LEGACY_STATE).is_file():
            return _load_legacy(ckpt / LEGACY_STATE)
        raise FileNotFoundError(f"{str(ckpt)!r}: no {STATE} (not a training checkpoint)")
    encoded = read_json(file)
    tensors = read_safetensors(ckpt / STATE_TENSORS)
    if not isinstance(encoded, dict):
        raise DamagedFileError(file, "expected a JSON object")
    return decode_state(encoded, tensors, ckpt / STATE_TENSORS)
