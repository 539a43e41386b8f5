"""`BuildConfig`: what `casa build` makes, as one checked dataclass.

Design decisions:
- It holds a `casa.config.FusionConfig` rather than repeating its fields: a
  new fusion field or variant is declared once, in `casa.config`, and the
  `casa build` flags are derived from the dataclass fields
  (`casa.cli.build`).
- Values are checked by `casa.config.check_fields`, the rule every config
  goes through; ranges and choices are declared on the fields.
- This module imports no torch, so that `casa --help` (which builds the
  flags from it) stays fast; `pretrained.build` maps `DTYPE_NAMES` to torch
  dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from casa.config import TOKEN_REDUCTIONS, FusionConfig, check_fields, setting

__all__ = ["DTYPE_NAMES", "BuildConfig", "check_zero_fusion_output"]

DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass
class BuildConfig:
    lm: str = setting(help="HF causal-LM directory (Llama, Qwen2, Mistral, Qwen2.5-VL)")
    vision: str | None = None  # None: the built-in ViT, trained from scratch
    fusion: FusionConfig = field(default_factory=FusionConfig)
    freeze_lm: bool = True
    vision_trainable_blocks: int = setting(2, ge=-1, help="train the last k vision blocks (-1: the whole encoder)")
    dtype: str = setting("auto", choices=("auto", *DTYPE_NAMES), help="weights dtype (auto: the LM checkpoint's)")
    token_reduction: str = setting("none", choices=TOKEN_REDUCTIONS, help="merge patches into fewer image tokens")
    reduction_factor: int = setting(2, ge=1, help="side of the square of patches merged into one token")
    image_size: int | None = setting(None, ge=1, help="input side (Qwen2.5-VL: a multiple of 28; SigLIP/CLIP: "
                                                       "the model's)")
    tokenizer: str = "lm"  # "lm" (the LM directory's), "byte", or a tokenizer directory
    image_prefix: str | None = None  # default: from the chat template
    gist_token: str | None = None  # default: from the chat template
    gist: bool = True
    zero_fusion_output: bool = setting(False, help="fusion output projections start at zero, so the built model "
                                                   "equals its LM exactly (parallel / before placements)")
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        check_fields(self, "build")
        if self.zero_fusion_output:
            check_zero_fusion_output(self.fusion, "build")


def check_zero_fusion_output(fusion: FusionConfig, where: str) -> None:
    """ValueError unless zeroing the fusion output projections (`hf_lm.zero_fusion_outputs`) can make a
    model of `fusion` equal its LM: not for the shared variants, not in `replace` placement."""
    if fusion.shares_sa_projections:
        raise ValueError(f"{where}: zero_fusion_output with variant={fusion.variant!r}: its output projection "
                         "is the block's self-attention's, which zeroing would remove; use casa or ca")
    if fusion.placement == "replace":
        raise ValueError(f"{where}: zero_fusion_output with placement='replace' would leave those blocks without "
                         "attention; with 'replace', casa's copy-of-SA init already equals the LM on text alone")
