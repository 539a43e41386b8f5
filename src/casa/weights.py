"""Building big models without paying for them twice.

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
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open


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
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    if not index.is_file():
        raise FileNotFoundError(f"{str(path)!r}: neither model.safetensors nor model.safetensors.index.json "
                                "(only safetensors checkpoints are supported)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read the weight_map of {str(index)!r}: {e}") from e
    files = {k: d / v for k, v in weight_map.items()}
    missing = sorted({str(f) for f in files.values() if not f.is_file()})
    if missing:
        raise FileNotFoundError(f"{str(index)!r} names shard files that do not exist: {missing}")
    for file in set(files.values()):
        with safe_open(file, framework="pt") as f:
            present = set(f.keys())
        absent = sorted(k for k, v in files.items() if v == file and k not in present)
        if absent:
            raise ValueError(f"{str(index)!r} maps {absent} to {str(file)!r}, which does not contain them")
    return files


def meta_parameters(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters(remove_duplicate=False) if p.is_meta]


def check_shapes(targets: dict[str, torch.Tensor], files: dict[str, Path], where: str) -> None:
    """ValueError naming the first checkpoint tensor whose shape differs from its target."""
    for file, names in _by_file(files, targets).items():
        with safe_open(file, framework="pt") as f:
            for n in names:
                shape = tuple(f.get_slice(n).get_shape())
                if shape != tuple(targets[n].shape):
                    raise ValueError(f"{where}: tensor {n!r} has shape {shape}, the model expects "
                                     f"{tuple(targets[n].shape)}")


@torch.no_grad()
def copy_safetensors(targets: dict[str, torch.Tensor], files: dict[str, Path]) -> None:
    """`targets[name].copy_(tensor)` for every name, one tensor in memory at a time."""
    for file, names in _by_file(files, targets).items():
        with safe_open(file, framework="pt") as f:
            for n in names:
                targets[n].copy_(f.get_tensor(n))


def _by_file(files: dict[str, Path], names) -> dict[Path, list[str]]:
    groups: dict[Path, list[str]] = {}
    for name in names:
        groups.setdefault(files[name], []).append(name)
    return groups
