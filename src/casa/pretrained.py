"""casa's own model directory: `config.json` + `model.safetensors` (+ tokenizer).

Writes are atomic: everything goes to a temporary sibling directory that is
renamed into place, and an existing directory is only replaced once the new
one is complete, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model

from .config import ModelConfig
from .model import CasaModel

FORMAT = "casa-v1"


def save_pretrained(model: CasaModel, path, *, tokenizer=None, extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        config = {"casa_format": FORMAT, "model": model.config.to_dict(), **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(tmp / "model.safetensors"))  # shared (tied) tensors stored once
        if tokenizer is not None:
            tokenizer.save(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path) -> dict:
    path = Path(path)
    file = path / "config.json"
    if not path.is_dir() or not file.is_file():
        raise ValueError(f"{str(path)!r} is not a casa model directory (no config.json)")
    try:
        config = json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{str(file)!r}: not valid JSON ({e})") from e
    if config.get("casa_format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a casa model directory "
                         f"(config.json has casa_format={config.get('casa_format')!r}, expected {FORMAT!r})")
    return config


def from_pretrained(path, *, dtype: torch.dtype | None = None, device=None) -> CasaModel:
    config = read_config(path)
    model = CasaModel(ModelConfig.from_dict(config["model"]))
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{str(path)!r}: no model.safetensors")
    state = load_file(str(weights))
    expected = set(model.state_dict())
    if model.config.lm.tie_embeddings:
        expected.discard("lm_head.weight")  # stored once, as embed.weight
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{str(weights)!r}: missing tensors {missing[:10]}, unexpected tensors {unexpected[:10]}")
    model.load_state_dict(state, strict=False)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()
