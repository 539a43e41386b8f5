"""Configuration dataclasses, one per concern, and the one rule that checks their values.

Everything a model needs to be rebuilt lives in `ModelConfig`, which
round-trips through plain dicts (`to_dict` / `from_dict`) so that it can be
saved as JSON next to the weights.

Design decisions:
- Unknown keys are an error, never ignored: a typo in a config file must not
  silently train the wrong model.
- One validation layer: `check_fields` checks every field of a config
  dataclass against its annotation (`int`, `float`, `bool`, `str`, `X | None`,
  `tuple[...]`, `list[...]`, `dict`, a nested config) and against the range
  declared beside the field with `setting(...)` (`ge` / `gt` / `le` / `lt`,
  `choices`, `pattern`). `build` (dicts from files, `--set`, the CLI) runs it
  on the given values before constructing, so that a message names the key as
  the user wrote it (`train.steps=2.5: expected a whole number`); the config
  classes run it again in `__post_init__`, so that Python construction obeys
  the same rule. Rules between fields (d_model divisible by n_heads) stay in
  `__post_init__`: they are not about one value.
- Floats must be finite everywhere: a NaN or an infinity is never a setting.
  Whole numbers are refused where a number with a fraction is given
  (`steps=2.5`), booleans are refused where numbers are expected.
- `parse_value` is the one rule turning command-line text into a value (for
  `--set` and every KEY=VALUE flag): JSON where the text is JSON, else the text.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FUSION_VARIANTS", "PLACEMENTS", "TOKEN_REDUCTIONS", "VISION_KINDS", "ConfigError", "FusionConfig",
           "LMConfig", "ModelConfig", "PROJECTORS", "VisionConfig", "build", "check_fields", "check_value", "parse_value",
           "setting"]

FUSION_VARIANTS = ("insertion", "ca", "ca_shared", "casa", "casa_shared", "ca_ffn", "gated_ca")
PLACEMENTS = ("parallel", "before", "replace")
TOKEN_REDUCTIONS = ("none", "unshuffle", "pool")
VISION_KINDS = ("vit", "hf")
PROJECTORS = ("mlp", "identity")


class ConfigError(ValueError):
    """A config value of the wrong type, out of its range, or an unknown key."""


# ----------------------------------------------------------------------------- declaring and checking
def setting(default: Any = dataclasses.MISSING, *, factory=dataclasses.MISSING, ge=None, gt=None, le=None, lt=None,
            choices: tuple | None = None, pattern: str | None = None, expect: str | None = None,
            help: str | None = None):
    """A dataclass field with its allowed range (checked by `check_value`).

    `ge`/`gt`/`le`/`lt` bound a number (each element of a tuple or list);
    `choices` lists the allowed values; `pattern` is a regular expression a
    string must match in full, described to the user by `expect`. `help` is
    the one-line description a command-line flag derived from the field shows.
    """
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, pattern=pattern, expect=expect,
                                  help=help).items() if v is not None}
    return field(default=default, default_factory=factory, metadata=meta)


def parse_value(text: str):
    """A command-line value: `"3"` -> 3, `"0.5"` -> 0.5, `"true"` -> True, `"[1,2]"` -> [1, 2],
    `"null"` -> None, anything that is not JSON -> the text itself (`"casa"`)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} {_describe(args[0]).removeprefix('a ')}s"
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ')}s"
    if dataclasses.is_dataclass(tp):
        return "a table of keys"
    return {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string", dict: "a table of keys",
            type(None): "null"}.get(origin or tp, getattr(tp, "__name__", str(tp)))


_MISMATCH = object()


def _conform(value, tp, where: str):
    """`value` as type `tp` (ints widened to float, lists to tuples), or `_MISMATCH`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            got = _conform(value, a, where)
            if got is not _MISMATCH:
                return got
        return _MISMATCH
    if tp is type(None):
        return None if value is None else _MISMATCH
    if tp is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if tp is int:
        return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else _MISMATCH
    if tp is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else _MISMATCH
    if tp is str:
        return value if isinstance(value, str) else _MISMATCH
    if tp is dict or origin is dict:
        return value if isinstance(value, dict) else _MISMATCH
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            return _MISMATCH
        kinds = [args[0]] * len(value) if origin is list else args
        items = [_conform(v, a, where) for v, a in zip(value, kinds)]
        return _MISMATCH if any(i is _MISMATCH for i in items) else origin(items)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return build(tp, value, where) if isinstance(value, dict) else _MISMATCH
    raise TypeError(f"{where}: annotation {tp!r} is not supported by casa.config.check_value")


def _range_error(value, meta: dict) -> str | None:
    if "choices" in meta and value not in meta["choices"]:
        if "pattern" in meta and isinstance(value, str) and re.fullmatch(meta["pattern"], value):
            return None
        return f"expected {meta.get('expect') or 'one of ' + ', '.join(map(str, meta['choices']))}"
    if "pattern" in meta and "choices" not in meta and not re.fullmatch(meta["pattern"], value):
        return f"expected {meta.get('expect', 'text matching ' + meta['pattern'])}"
    for key, test, words in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                             ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        if key in meta and isinstance(value, numbers.Real) and not test(value, meta[key]):
            return f"must be {words} {meta[key]}"
    return None


def check_value(where: str, value, tp, meta: dict | None = None):
    """`value` checked against annotation `tp` and the range in `meta` (from `setting`);
    returns it normalised (int -> float for floats, list -> tuple for tuples).

    Raises ConfigError naming `where` (e.g. "train.steps"), the value and what is expected.
    """
    meta = meta or {}
    got = _conform(value, tp, where)
    if got is _MISMATCH:
        raise ConfigError(f"{where}={value!r}: expected {_describe(tp)}")
    for item in (got if isinstance(got, (tuple, list)) else [got]):
        problem = None if item is None else _range_error(item, meta)
        if problem:
            raise ConfigError(f"{where}={value!r}: {problem}")
    return got


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_fields(obj, where: str | None = None) -> None:
    """Check (and normalise in place) every field of config dataclass `obj`."""
    where = where or type(obj).__name__
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, check_value(f"{where}.{f.name}", getattr(obj, f.name), hints[f.name], f.metadata))


def build(cls, values: dict[str, Any], where: str):
    """Instantiate dataclass `cls` from a dict, naming unknown keys and checking every value's type and range.

    `where` is the section as the user writes it ("train", "model.lm"); messages name `where.key`.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where}={values!r}: expected a table of keys (e.g. {where}.<key>=...)")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known keys are {sorted(fields)}")
    hints = _hints(cls)
    checked = {k: check_value(f"{where}.{k}", v, hints[k], fields[k].metadata) for k, v in values.items()}
    return cls(**checked)


# ----------------------------------------------------------------------------- the model
def _positive(default, help=None):
    return setting(default, ge=1, help=help)


@dataclass
class LMConfig:
    """A Llama / Qwen2-family decoder."""

    vocab_size: int = _positive(256)
    d_model: int = _positive(128)
    n_layers: int = _positive(4)
    n_heads: int = _positive(4)
    n_kv_heads: int = _positive(2)
    head_dim: int | None = _positive(None)  # defaults to d_model // n_heads
    d_ff: int = _positive(352)
    rope_theta: float = setting(10000.0, gt=0)
    norm_eps: float = setting(1e-6, gt=0)
    qkv_bias: bool = False
    tie_embeddings: bool = True
    # Qwen2.5-VL's multimodal RoPE: frequencies per (t, h, w) component; None = 1-D RoPE
    mrope_section: list[int] | None = setting(None, ge=1)

    def __post_init__(self):
        check_fields(self)
        if self.mrope_section is not None and len(self.mrope_section) != 3:
            raise ConfigError(f"LMConfig: mrope_section={self.mrope_section}: expected 3 counts (t, h, w)")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(f"LMConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        if self.mrope_section is not None and 2 * sum(self.mrope_section) != self.head_dim:
            raise ConfigError(f"LMConfig: mrope_section={self.mrope_section} adds up to {sum(self.mrope_section)}, "
                              f"expected head_dim / 2 = {self.head_dim // 2}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"LMConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")


@dataclass
class VisionConfig:
    """The image side: an encoder, optional token reduction, a projector to the LM width.

    `kind="vit"` is the small built-in ViT (trainable from scratch on CPU);
    `kind="hf"` wraps a transformers vision model loaded from `path`.
    """

    kind: str = setting("vit", choices=VISION_KINDS)
    path: str | None = None  # local directory for kind="hf"
    image_size: int = _positive(64)
    patch_size: int = _positive(8)
    channels: int = _positive(3)
    d_model: int = _positive(128)
    n_layers: int = _positive(2)
    n_heads: int = _positive(4)
    d_ff: int = _positive(256)
    token_reduction: str = setting("none", choices=TOKEN_REDUCTIONS, help="merge patches into fewer image tokens")
    reduction_factor: int = _positive(2, help="side of the square of patches merged into one token")
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = setting((0.5, 0.5, 0.5), gt=0)
    # Qwen2.5-VL's dynamic resolution (vision/dynamic.py): each image keeps its aspect ratio, resized to
    # multiples of patch_size with min_pixels..max_pixels pixels; None: every image at image_size x image_size
    min_pixels: int | None = _positive(None)
    max_pixels: int | None = _positive(None)
    projector: str = setting("mlp", choices=PROJECTORS, help="encoder output to LM width: a fresh MLP, or "
                                                             "identity (an encoder made for this LM)")

    def __post_init__(self):
        check_fields(self)
        if (self.min_pixels is None) != (self.max_pixels is None):
            raise ConfigError("VisionConfig: min_pixels and max_pixels go together (dynamic resolution)")
        if self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ConfigError(f"VisionConfig: min_pixels={self.min_pixels} > max_pixels={self.max_pixels}")
        if self.kind == "vit" and self.image_size % self.patch_size:
            raise ConfigError(
                f"VisionConfig: image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )

    @property
    def dynamic(self) -> bool:
        """Images keep their own size (Qwen2.5-VL's rule) instead of image_size x image_size."""
        return self.max_pixels is not None

    @property
    def grid(self) -> int:
        """Patches per image side before token reduction."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        """Image tokens handed to the LM after token reduction."""
        g = self.grid
        if self.token_reduction != "none":
            if g % self.reduction_factor:
                raise ConfigError(
                    f"VisionConfig: patch grid {g} is not divisible by reduction_factor={self.reduction_factor}"
                )
            g //= self.reduction_factor
        return g * g


@dataclass
class FusionConfig:
    """How image tokens reach the text stream (docs/design.md §3).

    `layers` (explicit block indices) wins over `every` (blocks 0, n, 2n, ...).
    `text_keys=False` is the paper's ablation: CASA without its text keys,
    which is exactly `ca`. `frame_memory=k` (a square, at most the tokens of
    an image; not with `insertion`) also splices k average-pooled tokens of
    each image into the text stream, where insertion would splice them all,
    so that a bounded summary of every frame stays in the KV cache after its
    window closes (docs/design.md §3).
    """

    variant: str = setting("casa", choices=FUSION_VARIANTS, help="fusion variant (docs/design.md §3)")
    placement: str = setting("parallel", choices=PLACEMENTS, help="where the fusion layer sits in its block")
    every: int = _positive(1, help="a fusion layer in every n-th block")
    layers: list[int] | None = setting(None, ge=0, help="explicit fusion blocks, comma-separated (wins over every)")
    init_from_sa: bool = setting(True, help="fusion layers start as copies of their block's self-attention")
    text_keys: bool = setting(True, help="casa: text queries also attend to their window's text (the ablation: no)")
    # k average-pooled tokens of each image spliced into the text stream before its insertion point (a small
    # insertion beside the fusion layers: they take positions and enter the KV cache); 0: none
    frame_memory: int = setting(0, ge=0, le=1024, help="k pooled tokens of each image kept in the text stream "
                                                        "(1, 4, 9, 16, ...; 0: none)")

    def __post_init__(self):
        check_fields(self)
        if self.layers is not None:
            self.layers = sorted(set(self.layers))
        if self.frame_memory:
            side = math.isqrt(self.frame_memory)
            if side * side != self.frame_memory:
                raise ConfigError(f"FusionConfig.frame_memory={self.frame_memory}: expected a square (1, 4, 9, "
                                  "16, ...): an image's token grid is pooled to side x side tokens")
            if self.variant == "insertion":
                raise ConfigError("FusionConfig.frame_memory: variant 'insertion' already keeps every image "
                                  "token in the text stream; frame memory is for the variants that keep them "
                                  f"out of it ({', '.join(v for v in FUSION_VARIANTS if v != 'insertion')})")

    def fusion_layers(self, n_layers: int) -> list[int]:
        """Indices of the blocks that carry a fusion layer."""
        if self.variant == "insertion":
            return []
        layers = self.layers if self.layers is not None else list(range(0, n_layers, self.every))
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(f"FusionConfig.layers: {bad} out of range for a model of {n_layers} blocks")
        return layers

    @property
    def uses_text_keys(self) -> bool:
        return self.variant in ("casa", "casa_shared") and self.text_keys

    @property
    def shares_sa_projections(self) -> bool:
        return self.variant in ("ca_shared", "casa_shared")


@dataclass
class ModelConfig:
    """Everything a CasaModel needs to be rebuilt: the LM, the vision side, the fusion."""

    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)

    def __post_init__(self):
        self.check_frame_memory()

    def check_frame_memory(self) -> None:
        """ConfigError where `fusion.frame_memory` does not fit the image side: its pooling needs a
        square grid of at least that many tokens, of the same size for every image, and 1-D positions."""
        k = self.fusion.frame_memory
        if not k:
            return
        if self.vision.dynamic:
            raise ConfigError("fusion.frame_memory: images of their own sizes (vision.min_pixels / max_pixels) "
                              "are not supported; give every image one size")
        if self.lm.mrope_section is not None:
            raise ConfigError("fusion.frame_memory: multimodal RoPE (lm.mrope_section) is not supported")
        n = self.vision.tokens_per_image
        if k > n:
            raise ConfigError(f"fusion.frame_memory={k}: more than the {n} tokens of an image")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model") -> "ModelConfig":
        """From `{"lm": {...}, "vision": {...}, "fusion": {...}}`; messages name `where.lm.key` etc."""
        return build(cls, d, where)
