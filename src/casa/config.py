"""Configuration dataclasses, one per concern.

Everything a model needs to be rebuilt lives in `ModelConfig`, which
round-trips through plain dicts (`to_dict` / `from_dict`) so that it can be
saved as JSON next to the weights. Unknown keys are an error, never ignored:
a typo in a config file must not silently train the wrong model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FUSION_VARIANTS = ("insertion", "ca", "ca_shared", "casa", "casa_shared", "ca_ffn", "gated_ca")
PLACEMENTS = ("parallel", "before", "replace")
TOKEN_REDUCTIONS = ("none", "unshuffle", "pool")
VISION_KINDS = ("vit", "hf")


@dataclass
class LMConfig:
    """A Llama / Qwen2-family decoder."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # defaults to d_model // n_heads
    d_ff: int = 352
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"LMConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LMConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")


@dataclass
class VisionConfig:
    """The image side: an encoder, optional token reduction, a projector to the LM width.

    `kind="vit"` is the small built-in ViT (trainable from scratch on CPU);
    `kind="hf"` wraps a transformers vision model loaded from `path`.
    """

    kind: str = "vit"
    path: str | None = None  # local directory for kind="hf"
    image_size: int = 64
    patch_size: int = 8
    channels: int = 3
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    token_reduction: str = "none"
    reduction_factor: int = 2  # side of the square of patches merged into one token
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        if self.kind not in VISION_KINDS:
            raise ValueError(f"VisionConfig.kind={self.kind!r}: expected one of {VISION_KINDS}")
        if self.token_reduction not in TOKEN_REDUCTIONS:
            raise ValueError(
                f"VisionConfig.token_reduction={self.token_reduction!r}: expected one of {TOKEN_REDUCTIONS}"
            )
        if self.kind == "vit" and self.image_size % self.patch_size:
            raise ValueError(
                f"VisionConfig: image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)

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
                raise ValueError(
                    f"VisionConfig: patch grid {g} is not divisible by reduction_factor={self.reduction_factor}"
                )
            g //= self.reduction_factor
        return g * g


@dataclass
class FusionConfig:
    """How image tokens reach the text stream (docs/design.md §3).

    `layers` (explicit block indices) wins over `every` (blocks 0, n, 2n, ...).
    `text_keys=False` is the paper's ablation: CASA without its text keys,
    which is exactly `ca`.
    """

    variant: str = "casa"
    placement: str = "parallel"
    every: int = 1
    layers: list[int] | None = None
    init_from_sa: bool = True
    text_keys: bool = True

    def __post_init__(self):
        if self.variant not in FUSION_VARIANTS:
            raise ValueError(f"FusionConfig.variant={self.variant!r}: expected one of {FUSION_VARIANTS}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"FusionConfig.placement={self.placement!r}: expected one of {PLACEMENTS}")
        if self.every < 1:
            raise ValueError(f"FusionConfig.every={self.every}: must be >= 1")
        if self.layers is not None:
            self.layers = sorted(set(int(i) for i in self.layers))

    def fusion_layers(self, n_layers: int) -> list[int]:
        """Indices of the blocks that carry a fusion layer."""
        if self.variant == "insertion":
            return []
        layers = self.layers if self.layers is not None else list(range(0, n_layers, self.every))
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"FusionConfig.layers: {bad} out of range for a model of {n_layers} blocks")
        return layers

    @property
    def uses_text_keys(self) -> bool:
        return self.variant in ("casa", "casa_shared") and self.text_keys

    @property
    def shares_sa_projections(self) -> bool:
        return self.variant in ("ca_shared", "casa_shared")


@dataclass
class ModelConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        parts = {"lm": LMConfig, "vision": VisionConfig, "fusion": FusionConfig}
        unknown = set(d) - set(parts)
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {sorted(unknown)}; expected {sorted(parts)}")
        return cls(**{k: build(parts[k], d.get(k, {}), k) for k in parts})


def build(cls, values: dict[str, Any], where: str):
    """Instantiate dataclass `cls` from a dict, naming unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known keys are {sorted(names)}")
    return cls(**values)
