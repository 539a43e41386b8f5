"""casa's own model directory: one directory is one model, for `casa eval`,
`casa caption`, `casa train` (init) and Python alike.

Layout:
- `config.json`: `{"casa_format": "casa-v1", "model": ModelConfig,
  "processor": {gist, gist_token, image_prefix}, ...extra}`;
- `model.safetensors`, or above `max_shard_size` the Hugging Face sharded
  layout (`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`);
- `vision/` for a transformers vision encoder: its config only (weights are
  in the model's safetensors), so the directory is self-contained: the
  saved `vision.path` is `"vision"`, resolved against the directory on load;
- the tokenizer (`tokenizer.save`).

Design decisions:
- Writes are atomic (`casa.files.atomic_directory`): everything goes to a
  temporary sibling directory that is renamed into place, and an existing
  directory is only replaced once the new one is complete, so a crash never
  leaves a half-written model behind.
- Only a casa model directory is ever replaced, and only with
  `overwrite=True` (`model_dir.check_model_output`): a file or a folder of
  other files at the destination is refused, never deleted.
- `write_model` fills a directory that the caller made (the trainer adds its
  state to the same temporary directory before the rename); `save_pretrained`
  is the checked, atomic, whole-directory write.
- Tied tensors (lm_head = embeddings) are stored once, under the first name.
- Loading builds the structure on the meta device and fills it tensor by
  tensor from the memory-mapped files, in the requested dtype and directly on
  the requested device: peak memory is the model plus one tensor. Names and
  shapes are checked first; a mismatch is a ValueError naming the tensors; a
  damaged file is a `casa.files.DamagedFileError` naming it.
"""

from __future__ import annotations

import json
import os
import re
from collections import namedtuple
from pathlib import Path

import torch
from safetensors.torch import save_file

from casa.config import ModelConfig
from casa.core.model import CasaModel
from casa.files import atomic_directory
from casa.pretrained.model_dir import FORMAT, check_model_output, read_config
from casa.pretrained.runs import resolve_model_dir
from casa.vision.hf import structure_only
from casa.weights import (
    check_shapes,
    copy_safetensors,
    empty_parameters,
    materialize,
    meta_parameters,
    open_safetensors,
    weight_files,
)

# read_config lives in pretrained.model_dir; re-exported here for existing callers
__all__ = ["DEFAULT_SHARD", "PROCESSOR_DEFAULTS", "Loaded", "empty_model", "from_pretrained", "load",
           "load_processor", "model_config", "parse_size", "processor_config", "processor_settings", "read_config",
           "save_pretrained", "write_model"]

DEFAULT_SHARD = "2GB"
PROCESSOR_DEFAULTS = {"gist": True, "gist_token": "<|gist|>", "image_prefix": None}
VISION_DIR = "vision"
Loaded = namedtuple("Loaded", "model tokenizer processor")


# ----------------------------------------------------------------------------- save
def parse_size(size) -> int:
    """Bytes from an int or a string like "500MB", "2GB", "1.5GiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(size), re.I)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a size like '2GB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


def _unique_tensors(model) -> dict[str, torch.Tensor]:
    """state_dict with each shared storage once (first name wins, e.g. embed.weight before lm_head.weight)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else name
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def _write_weights(tensors: dict[str, torch.Tensor], out: Path, max_bytes: int) -> None:
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes

    def write(names, file):
        save_file({n: tensors[n].detach().cpu().contiguous() for n in names}, str(out / file),
                  metadata={"format": "pt"})

    if len(shards) == 1:
        write(shards[0], "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write(names, file)
        weight_map.update({n: file for n in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total, "format": FORMAT}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def processor_config(processor) -> dict:
    """The settings of a `data.Processor` (or a dict of them) as saved in config.json."""
    if processor is None:
        return {}
    if isinstance(processor, dict):
        unknown = set(processor) - set(PROCESSOR_DEFAULTS)
        if unknown:
            raise ValueError(f"processor settings: unknown keys {sorted(unknown)}; known: {sorted(PROCESSOR_DEFAULTS)}")
        return {**PROCESSOR_DEFAULTS, **processor}
    gist = getattr(processor, "gist", None)
    return {"gist": gist is not None, "gist_token": gist or PROCESSOR_DEFAULTS["gist_token"],
            "image_prefix": getattr(processor, "image_prefix", None)}


def write_model(model: CasaModel, out: Path, *, tokenizer=None, extra: dict | None = None, processor=None,
                max_shard_size=DEFAULT_SHARD) -> None:
    """Write `model`'s files into the existing directory `out` (not atomic: see `save_pretrained`)."""
    model_cfg = model.config.to_dict()
    if model.config.vision.kind == "hf":
        model.vision.encoder.save_config(out / VISION_DIR)
        model_cfg["vision"]["path"] = VISION_DIR
    config = {"casa_format": FORMAT, "model": model_cfg, **(extra or {})}
    if processor is not None:
        config["processor"] = processor_config(processor)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_weights(_unique_tensors(model), out, parse_size(max_shard_size))
    if tokenizer is not None:
        tokenizer.save(out)


def save_pretrained(model: CasaModel, path, *, tokenizer=None, extra: dict | None = None, processor=None,
                    max_shard_size=DEFAULT_SHARD, overwrite: bool = False) -> Path:
    """Write `model` (+ tokenizer, processor settings, `extra` config keys) as one directory, atomically.

    An existing casa model directory at `path` is replaced only with `overwrite`;
    a file or a non-empty folder of anything else is refused (ValueError).
    """
    parse_size(max_shard_size)  # a bad size is refused before anything is written
    if processor is not None:
        processor_config(processor)
    path = check_model_output(path, "save_pretrained", overwrite=overwrite)
    with atomic_directory(path) as tmp:
        write_model(model, tmp, tokenizer=tokenizer, extra=extra, processor=processor, max_shard_size=max_shard_size)
    return path


# ----------------------------------------------------------------------------- load
def model_config(path) -> ModelConfig:
    """The ModelConfig of a casa directory, its vision directory resolved against `path`."""
    d = json.loads(json.dumps(read_config(path)["model"]))
    vision = d.get("vision", {})
    if vision.get("kind") == "hf" and vision.get("path") and not os.path.isabs(vision["path"]):
        vision["path"] = str(Path(path) / vision["path"])
    return ModelConfig.from_dict(d)


def processor_settings(path_or_config) -> dict:
    """gist / gist_token / image_prefix of a model directory: its "processor" section,
    else those of its "train" section (trainer checkpoints), else the defaults."""
    config = path_or_config if isinstance(path_or_config, dict) else read_config(path_or_config)
    section = config.get("processor") or {k: v for k, v in config.get("train", {}).items() if k in PROCESSOR_DEFAULTS}
    return {**PROCESSOR_DEFAULTS, **section}


def _stored_dtype(files: dict[str, Path]) -> torch.dtype:
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    for name, file in files.items():
        with open_safetensors(file) as f:
            dt = f.get_slice(name).get_dtype()
        if dt in names:
            return names[dt]
    return torch.float32


def empty_model(config: ModelConfig, model_class=CasaModel) -> CasaModel:
    """A CasaModel (or `model_class`) whose parameters are on the meta device (nothing allocated, nothing loaded)."""
    with empty_parameters(), structure_only():
        return model_class(config)


# Parameter names of earlier casa versions -> today's (directories stay loadable).
RENAMED = ((".n1.", ".input_layernorm."), (".n2.", ".post_attention_layernorm."))


def current_name(name: str) -> str:
    """Today's name of a tensor stored under an earlier casa name (the name itself otherwise)."""
    for old, new in RENAMED:
        name = name.replace(old, new)
    return name


def from_pretrained(path, *, dtype: torch.dtype | None = None, device=None, model_class=CasaModel) -> CasaModel:
    """Load a casa model directory, or a training run's latest checkpoint (dtype: the stored one unless
    given), in eval mode, as a `model_class` (CasaModel or a subclass that adds no parameters)."""
    path = resolve_model_dir(path)
    model = empty_model(model_config(path), model_class)
    try:
        files = weight_files(path)
    except FileNotFoundError as e:
        raise ValueError(f"{str(path)!r}: no model weights ({e})") from None
    where = f"from_pretrained({str(path)!r})"
    source = {current_name(n): n for n in files}  # model's name -> name in the file
    groups: dict[int, list[str]] = {}  # one entry per tensor object: all its names (ties)
    tensors = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
        tensors[id(t)] = t
    missing = [names[0] for names in groups.values() if not any(n in source for n in names)]
    unexpected = sorted(set(source) - {n for names in groups.values() for n in names})
    if missing or unexpected:
        raise ValueError(f"{where}: checkpoint does not match the config; missing tensors {missing[:10]} "
                         f"({len(missing)} in all), unexpected tensors {unexpected[:10]} ({len(unexpected)} in all)")
    stored = {next(n for n in names if n in source): key for key, names in groups.items()}
    check_shapes({source[n]: tensors[k] for n, k in stored.items()}, files, where)
    materialize(model, dtype=dtype or _stored_dtype(files), device=device)
    by_name = model.state_dict(keep_vars=True)
    copy_safetensors({source[n]: by_name[n] for n in stored}, files)
    left = meta_parameters(model)
    if left:  # a bug, never the user's fault: every parameter has a stored tensor
        raise RuntimeError(f"{where}: parameters left unloaded: {left[:10]}")
    if device is not None:
        model.to(device)  # buffers
    return model.eval()


def load_processor(path):
    """The processor (tokenizer, chat template, image markers, preprocessing) of a
    model directory or a run's latest checkpoint, without loading its weights.

    A directory saved without a tokenizer has no processor: ValueError saying how to
    load the model alone or save it with one.
    """
    from casa.data import Processor
    from casa.pretrained.tokenizer import has_tokenizer, load_tokenizer

    path = resolve_model_dir(path)
    settings = processor_settings(path)  # first: a folder that is not a casa model is named as such
    if not has_tokenizer(path):
        raise ValueError(f"{str(path)!r} holds a model saved without a tokenizer (save_pretrained(model, dir) "
                         "without tokenizer=), so it has no processor; load the model alone with "
                         "casa.from_pretrained(dir) or casa.CasaForConditionalGeneration.from_pretrained(dir), "
                         "or save it with its tokenizer: casa.save_pretrained(model, dir, tokenizer=..., "
                         "overwrite=True)")
    return Processor(load_tokenizer(path), model_config(path).vision, gist=settings["gist"],
                     gist_token=settings["gist_token"], image_prefix=settings["image_prefix"])


def load(path, *, dtype: torch.dtype | None = None, device=None) -> Loaded:
    """(model, tokenizer, processor) of a model directory or a run's latest checkpoint, ready for
    generation (the processor first: a directory without a tokenizer is refused before any weight loads)."""
    path = resolve_model_dir(path)
    processor = load_processor(path)
    model = from_pretrained(path, dtype=dtype, device=device)
    return Loaded(model, processor.tok, processor)
