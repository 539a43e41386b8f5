"""The trainer's configuration: `TrainConfig`, and reading a config file plus `--set` overrides.

A config is a TOML or JSON file `{"model": {...}, "train": {...}}`, plus
`--set section.key=value` overrides; a bare key means `train.<key>`.

Design decisions:
- Every value goes through `casa.config.build`, the one validation layer:
  unknown keys are errors naming them, a value of the wrong type or out of
  its range is an error naming the key, the value and what is expected
  (`train.steps=2.5: expected a whole number`). The ranges are declared on
  the fields below with `casa.config.setting`, nowhere else.
- `--set` values are parsed by `casa.config.parse_value` (JSON where the text
  is JSON, else the text), the rule every KEY=VALUE flag of casa uses.
- Overrides walk the config as a tree: setting a key below a value
  (`train.steps.x=1`) is refused, and setting a section to a value
  (`model.lm=3`) is refused by the type check.
- Reading a config imports no torch, so that a mistake in it is reported
  at once; the `difficulty` table is checked by the trainer before it builds
  the model (by the synthetic tasks' own dataclass, through the same `build`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from casa.config import (
    ConfigError,
    ModelConfig,
    build,
    check_fields,
    parse_value,
    setting,
)

__all__ = ["DEVICE_PATTERN", "DISTRIBUTED", "PRECISIONS", "TrainConfig", "apply_override", "load_config",
           "read_config_file"]

PRECISIONS = ("auto", "fp32", "bf16")
DISTRIBUTED = ("ddp", "fsdp")
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    init: str | None = None  # casa model directory to start from (else: new model from `model`)
    lm_init: str | None = None  # HF Llama/Qwen2 directory whose weights fill the LM
    tokenizer: str | None = None  # local HF tokenizer directory (default: the byte tokenizer)
    data: str = "color,count,position,compare"  # synthetic task names, or a .jsonl file
    eval_data: str | None = None  # default: the training tasks with seed + 1000
    difficulty: dict = field(default_factory=dict)
    seed: int = setting(0, ge=0)
    steps: int = setting(1000, ge=1)
    grad_accum: int = setting(1, ge=1)
    text_tokens: int = setting(2048, ge=1)  # per pack (= per micro-batch and rank)
    image_tokens: int = setting(20480, ge=0)
    # insertion's spliced image tokens count against text_tokens (True), or every variant packs the
    # same samples and insertion's rows are longer (False: `casa study`'s sample-matched protocol)
    insertion_counts_images: bool = True
    lr_new: float = setting(1e-4, ge=0)
    lr_pretrained: float = setting(1e-5, ge=0)
    weight_decay: float = setting(0.0, ge=0)
    betas: tuple[float, float] = setting((0.9, 0.95), ge=0, lt=1)
    warmup_steps: int = setting(100, ge=0)
    min_lr_ratio: float = setting(0.1, ge=0, le=1)
    grad_clip: float = setting(1.0, ge=0)  # 0: no clipping
    freeze_lm: bool | None = None  # None: the policy recorded by `casa build` in `init`, else False
    vision_trainable_blocks: int | None = setting(None, ge=-1)  # -1: all; k >= 0: encoder frozen but its last k
    precision: str = setting("auto", choices=PRECISIONS)  # auto: bf16 where supported
    backend: str = "auto"  # attention backend, checked against the device when the trainer starts
    device: str = setting("auto", pattern=DEVICE_PATTERN, expect="auto, cpu, cuda, cuda:N or mps")
    # tokens around images; None: the model directory's (init / checkpoint), else the built-in defaults
    gist: bool | None = None
    gist_token: str | None = None
    image_prefix: str | None = None  # "" for none
    distributed: str = setting("ddp", choices=DISTRIBUTED)  # under torchrun
    find_unused_parameters: bool = False  # DDP: set it for data with text-only packs
    log_every: int = setting(10, ge=1)
    eval_every: int = setting(0, ge=0)  # 0: no periodic evaluation
    eval_samples: int = setting(16, ge=1)  # per task
    save_every: int = setting(100, ge=0)  # 0: only at the end
    keep_last: int = setting(3, ge=0)  # 0: keep every checkpoint
    skip_bad_samples: bool = False

    def __post_init__(self):
        check_fields(self, "train")


# ------------------------------------------------------------------ files and overrides
def _toml():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def read_config_file(path) -> dict:
    """The dict of a TOML (`.toml`) or JSON (anything else) config file; errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config {str(path)!r} is a directory, not a config file")
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r}: no such config file")
    text = path.read_text()
    try:
        content = _toml().loads(text) if path.suffix == ".toml" else json.loads(text)
    except ValueError as e:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise ConfigError(f"config {str(path)!r}: cannot parse it as {kind}: {e}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"config {str(path)!r}: expected a table with 'model' and 'train' sections, "
                          f"got {type(content).__name__}")
    return content


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def apply_override(raw: dict, item: str) -> None:
    """Apply one `--set key=value` to the config dict `raw` in place (a bare key means `train.key`)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value (e.g. train.steps=100)")
    keys = key.strip().split(".")
    if keys[0] not in ("model", "train"):
        keys = ["train", *keys]
    node = raw
    for depth, k in enumerate(keys[:-1]):
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(keys[:depth + 1])}={child!r} is a value, not a section "
                              "with keys")
        node = child
    node[keys[-1]] = parse_value(value)


def load_config(path=None, overrides=(), base: dict | None = None) -> tuple[ModelConfig, TrainConfig]:
    """(model config, train config) from `base`, then a JSON / TOML file, then `key=value` overrides.

    Override keys are dotted paths (`train.steps=10`, `model.lm.d_model=64`);
    a bare key means `train.<key>`. Errors name the file (if any) and the key.
    """
    raw = json.loads(json.dumps(base or {}))
    if path is not None:
        _merge(raw, read_config_file(path))
    for item in overrides:
        apply_override(raw, item)
    where = f"config {str(path)!r}" if path else "config"
    unknown = set(raw) - {"model", "train"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; expected sections 'model' and 'train'")
    try:
        model = ModelConfig.from_dict(raw.get("model", {}))
        train = build(TrainConfig, raw.get("train", {}), "train")
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return model, train
