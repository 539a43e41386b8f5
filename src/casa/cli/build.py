"""`casa build`: a CASA VLM from a local Hugging Face LM and vision encoder.

Design decisions:
- The fusion flags are derived from `casa.config.FusionConfig`'s fields
  (name, type, choices, help), so a new fusion field or variant is declared
  once, in `casa.config`, and appears here by itself. `--fusion` is the
  historical name of `variant`; booleans get `--x / --no-x`; lists are
  comma-separated.
- Every flag value is checked by `casa.config.check_value`, the rule every
  config goes through, and a bad one is refused by argparse naming the flag.
- `--out` must be new, an empty folder, or (with `--overwrite`) a casa model
  directory; it is checked before anything is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from casa.config import ConfigError, FusionConfig, check_value, parse_value

__all__ = ["FUSION_FLAGS", "add_field_flag", "field_type", "fusion_from_args", "register", "run"]

FUSION_FLAGS = {"variant": "--fusion"}  # field -> flag, where the flag is not --field-name
_DEST = "fusion_"


def field_type(cls, name: str, flag: str):
    """An argparse `type` for field `name` of config dataclass `cls`: the text parsed
    (`casa.config.parse_value`; lists comma-separated) and checked by `check_value`
    against the field's type and declared range; a bad value is refused naming `flag`."""
    tp = typing.get_type_hints(cls)[name]
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
    kinds = (tp, *typing.get_args(tp))
    is_list = any(typing.get_origin(k) is list for k in kinds)

    def parse(text: str):
        value = [parse_value(x) for x in text.split(",")] if is_list else parse_value(text)
        if str in kinds and not isinstance(value, str) and not is_list:
            value = text  # a string field takes the text as written ("1" stays "1")
        try:
            return check_value(flag, value, tp, meta)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag}=")) from None  # argparse names the flag

    return parse


def add_field_flag(parser: argparse.ArgumentParser, cls, name: str, flag: str | None = None, *,
                   dest: str | None = None) -> None:
    """A flag for field `name` of `cls`: its default, its help and choices as declared with
    `casa.config.setting`, its values checked by `field_type`; booleans get `--x / --no-x`."""
    flag = flag or "--" + name.replace("_", "-")
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else None
    if typing.get_type_hints(cls)[name] is bool:
        parser.add_argument(flag, dest=dest or name, action=argparse.BooleanOptionalAction, default=default,
                            help=meta.get("help"))
    else:
        metavar = "{" + ",".join(meta["choices"]) + "}" if "choices" in meta else flag[2:].upper().replace("-", "_")
        parser.add_argument(flag, dest=dest or name, type=field_type(cls, name, flag), default=default,
                            metavar=metavar, help=meta.get("help"))


def fusion_from_args(args) -> FusionConfig:
    """The FusionConfig that the fusion flags describe."""
    return FusionConfig(**{f.name: getattr(args, _DEST + f.name) for f in dataclasses.fields(FusionConfig)})


def register(sub: argparse._SubParsersAction) -> None:
    from casa.pretrained.build_config import BuildConfig

    b = sub.add_parser("build", help="build a CASA VLM from a local HF LM and vision encoder directory")
    b.add_argument("--lm", required=True, help="HF causal-LM directory (Llama, Qwen2, Mistral, Qwen2.5-VL)")
    b.add_argument("--vision", default=None,
                   help="SigLIP / CLIP (vision) or Qwen2.5-VL directory (default: the built-in ViT, from scratch)")
    b.add_argument("--out", required=True, help="casa model directory to write (new, empty, or see --overwrite)")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it is a casa model directory")
    for f in dataclasses.fields(FusionConfig):  # every fusion field, as declared in casa.config
        add_field_flag(b, FusionConfig, f.name, FUSION_FLAGS.get(f.name), dest=_DEST + f.name)
    b.add_argument("--train-lm", action="store_true", help="keep the LM trainable (default: frozen)")
    for name in ("vision_trainable_blocks", "dtype", "token_reduction", "reduction_factor", "image_size",
                 "zero_fusion_output"):
        add_field_flag(b, BuildConfig, name)
    b.add_argument("--tokenizer", default="lm", help="'lm' (the LM directory's), 'byte', or a tokenizer directory")
    b.add_argument("--image-prefix", default=None, help="token before each image (default: from the template)")
    b.add_argument("--gist-token", default=None, help="token after each image (default: from the template)")
    b.add_argument("--no-gist", action="store_true", help="no token after images")
    b.add_argument("--max-shard-size", default="2GB", help="shard model.safetensors above this size")
    b.set_defaults(func=run)


def run(args) -> int:
    from casa.pretrained.build_config import BuildConfig
    from casa.pretrained.model_dir import check_model_output

    check_model_output(args.out, "--out", overwrite=args.overwrite)  # before torch is even imported
    cfg = BuildConfig(lm=args.lm, vision=args.vision, fusion=fusion_from_args(args), freeze_lm=not args.train_lm,
                      vision_trainable_blocks=args.vision_trainable_blocks, dtype=args.dtype,
                      token_reduction=args.token_reduction, reduction_factor=args.reduction_factor,
                      image_size=args.image_size, tokenizer=args.tokenizer, image_prefix=args.image_prefix,
                      gist_token=args.gist_token, gist=not args.no_gist, zero_fusion_output=args.zero_fusion_output)
    from casa.pretrained.build import run

    run(cfg, args.out, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    return 0
