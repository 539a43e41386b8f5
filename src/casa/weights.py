"""Weight and state files, read safely and lazily: building big models
without paying for them twice, and one reader of safetensors files that
turns a damaged file into an error naming it.

Design decisions:
- `empty_parameters()` makes every `nn.Parameter` created inside it live on
  the meta device (no memory, and the random init that follows is free), while
  buffers stay real: they are small and computed at construction (RoPE
  frequencies, position ids), so nothing has to recompute them later. It
  patches `nn.Module.register_parameter` for the duration (process-wide, so
  not for concurrent threads), like accelerate's `init_empty_weights`.
- `materialize()` then gives each meta parameter uninitialised storage of the
  requested dtype on the requested device, keeping ties (one storage per
  parameter object), and `copy_safetensors()` fills parameters tensor by
  tensor from memory-mapped safetensors files. Peak memory is the model plus
  one tensor: no state dict of the whole checkpoint ever exists.
- Whatever is left on the meta device after loading is a bug of the caller:
  `meta_parameters()` names it so that the caller can fail loudly.
- Every safetensors file casa reads (casa model directories and their
  shards, Hugging Face LM and vision checkpoints, the trainer state) is opened
  by `open_safetensors`: safetensors checks the header against the file size
  on open, so a zero-byte or truncated file is a `casa.files.DamagedFileError`
  naming the file, never a safetensors internal error. Nothing casa reads is
  a pickle: a pickle can run code when loaded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from casa.files import DamagedFileError, read_json

__all__ = ["by_file", "check_shapes", "copy_safetensors", "empty_parameters", "materialize", "meta_parameters",
           "open_safetensors", "read_safetensors", "weight_files"]


@contextlib.contextmanager
def open_safetensors(file):
    """`safe_open(file)` (torch tensors, memory-mapped), or FileNotFoundError / DamagedFileError naming `file`."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{str(file)!r}: no such file")
    try:
        handle = safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        reason = "empty file" if file.stat().st_size == 0 else f"not a complete safetensors file: {e}"
        raise DamagedFileError(file, reason) from None
    with handle as f:
        yield f


def read_safetensors(file) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, on the CPU (for small files: the trainer state)."""
    with open_safetensors(file) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@contextlib.contextmanager
def empty_parameters():
    """Parameters created in this block are on the meta device; buffers are not."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def materialize(module: nn.Module, *, dtype: torch.dtype | None = None, device=None) -> None:
    """Uninitialised storage for every meta parameter of `module` (floating ones in `dtype`)."""
    device = torch.device(device or "cpu")
    made: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in made:
                dt = dtype if (dtype is not None and p.is_floating_point()) else p.dtype
                made[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dt, device=device),
                                           requires_grad=p.requires_grad)
            sub._parameters[name] = made[id(p)]


def weight_files(path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it, for `model.safetensors` or a
    sharded `model.safetensors.index.json` (the Hugging Face layout, also casa's)."""
    d = Path(path)
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        with open_safetensors(single) as f:
            return {k: single for k in f.keys()}
    if not index.is_file():
        raise FileNotFoundError(f"{str(path)!r}: neither model.safetensors nor model.safetensors.index.json "
                                "(only safetensors checkpoints are supported)")
    content = read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise DamagedFileError(index, "no weight_map")
    files = {k: d / v for k, v in weight_map.items()}
    missing = sorted({str(f) for f in files.values() if not f.is_file()})
    if missing:
        raise FileNotFoundError(f"{str(index)!r} names shard files that do not exist: {missing}")
    for file in set(files.values()):
        with open_safetensors(file) as f:
            present = set(f.keys())
        absent = sorted(k for k, v in files.items() if v == file and k not in present)
        if absent:
            raise ValueError(f"{str(index)!r} maps {absent} to {str(file)!r}, which does not contain them")
    return files


def meta_parameters(module: nn.Module) -> list[str]:
    """Names of `module`'s parameters still on the meta device (never loaded)."""
    return [n for n, p in module.named_parameters(remove_duplicate=False) if p.is_meta]


def check_shapes(targets: dict[str, torch.Tensor], files: dict[str, Path], where: str) -> None:
    """ValueError naming the first checkpoint tensor whose shape differs from its target.

    `targets`: checkpoint name -> tensor of the model (any device, meta included);
    `files`: checkpoint name -> the safetensors file holding it (`weight_files`).
    """
    for file, names in by_file(files, targets).items():
        with open_safetensors(file) as f:
            for n in names:
                shape = tuple(f.get_slice(n).get_shape())
                if shape != tuple(targets[n].shape):
                    raise ValueError(f"{where}: tensor {n!r} has shape {shape}, the model expects "
                                     f"{tuple(targets[n].shape)}")


@torch.no_grad()
def copy_safetensors(targets: dict[str, torch.Tensor], files: dict[str, Path]) -> None:
    """`targets[name].copy_(tensor)` for every name, one tensor in memory at a time
    (cast to the target's dtype and device by `copy_`)."""
    for file, names in by_file(files, targets).items():
        with open_safetensors(file) as f:
            for n in names:
                targets[n].copy_(f.get_tensor(n))


def by_file(files: dict[str, Path], names) -> dict[Path, list[str]]:
    """`names` grouped by the file that holds them (`files`: name -> file), so each file is opened once."""
    groups: dict[Path, list[str]] = {}
    for name in names:
        groups.setdefault(files[name], []).append(name)
    return groups
