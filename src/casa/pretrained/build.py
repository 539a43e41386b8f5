"""`casa build`: a CASA VLM from a local Hugging Face causal LM and a vision encoder.

Design decisions:
- The model is built on the meta device, given storage once in the requested
  dtype (and device), then filled tensor by tensor from the memory-mapped
  checkpoints: the LM from its directory (`hf.load_lm_weights`), the encoder
  from its (`hf_vision.load_vision_weights`). Peak memory is the model plus
  one tensor, whatever the checkpoint sizes. What no checkpoint holds is new:
  the projector (fresh init), and the fusion layers, copies of their block's
  SA when `init_from_sa` (the paper's init), fresh otherwise; with
  `--zero-fusion-output` their output projections start at zero, so that the
  built model equals its LM exactly (parallel and before placements).
- Tokenizer and chat template come from the LM directory. The tokens around an
  image are read off the template itself: a probe conversation with one image
  part is rendered and the special tokens the template puts in its place are
  taken, the first as the image prefix and the last as the gist token (Qwen:
  `<|vision_start|>` ... `<|vision_end|>`; a single placeholder such as
  `<|image|>` becomes the gist token). A template that ignores image parts (a
  text-only LM) falls back to known pairs present in the vocabulary; with
  none, or with a marker the vocabulary does not hold as one token, the build
  stops with an error naming the tokens.
- The freeze policy (`freeze_lm`, `vision_trainable_blocks`) is applied to
  the returned model by `casa.pretrained.freeze.apply_freeze` (the rule the
  trainer applies too) and recorded in config.json's "build" section.
- `BuildConfig` (in `build_config`, light to import for the CLI) holds a
  `FusionConfig` rather than repeating its fields.
- The output directory is checked before anything is loaded
  (`directory.check_model_output`): a file or a folder that is not a casa
  model is refused, an existing model replaced only with `overwrite`.
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from casa.config import ModelConfig, VisionConfig
from casa.core.model import CasaModel, init_weights
from casa.files import read_json
from casa.pretrained.build_config import DTYPE_NAMES, BuildConfig
from casa.pretrained.directory import empty_model, save_pretrained
from casa.pretrained.freeze import FreezePolicy, apply_freeze, trainable_summary
from casa.pretrained.hf_lm import lm_config_from_hf, load_lm_weights, zero_fusion_outputs
from casa.pretrained.model_dir import check_model_output
from casa.weights import materialize, meta_parameters

__all__ = ["DTYPES", "KNOWN_IMAGE_TOKENS", "Built", "build", "image_tokens_from_template",
           "load_parts", "model_config", "qwen_own_vision", "resolve_tokenizer", "run", "save_built"]

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# (prefix, gist) pairs tried when the chat template renders no image tokens
KNOWN_IMAGE_TOKENS = (("<|vision_start|>", "<|vision_end|>"), ("<|image_start|>", "<|image_end|>"),
                      ("<img>", "</img>"))
_MARKER_RE = re.compile(r"<\|[^<>|\s]+\|>|</?[A-Za-z_][^<>\s]*>")


@dataclass
class Built:
    model: CasaModel
    tokenizer: object
    processor: dict  # gist / gist_token / image_prefix
    config: BuildConfig


# ----------------------------------------------------------------------------- tokenizer
def _single_token(tokenizer, text: str) -> bool:
    try:
        i = tokenizer.token_id(text)
    except KeyError:
        return False
    return tokenizer.encode(text, specials=True) == [i]


def image_tokens_from_template(tokenizer) -> tuple[str | None, str | None]:
    """(image prefix, gist token) that the tokenizer's chat template puts around an image."""
    where = f"tokenizer {str(getattr(tokenizer, 'path', ''))!r}"
    a, b = "\ue001", "\ue002"
    probe = [{"role": "user", "content": [{"type": "text", "text": a}, {"type": "image"},
                                          {"type": "text", "text": b}]}]
    try:
        rendered = tokenizer.tok.apply_chat_template(probe, tokenize=False)
    except Exception:  # noqa: BLE001 - a text-only template may choke on content lists
        rendered = ""
    span = rendered[rendered.index(a) + 1: rendered.index(b)] if a in rendered and b in rendered else ""
    markers = _MARKER_RE.findall(span)
    if markers:
        bad = [m for m in markers if not _single_token(tokenizer, m)]
        if bad:
            raise ValueError(f"{where}: its chat template renders an image as {span!r}, but the vocabulary "
                             f"has no single token for {bad}")
        return (None, markers[0]) if len(markers) == 1 else (markers[0], markers[-1])
    for pre, post in KNOWN_IMAGE_TOKENS:
        if _single_token(tokenizer, pre) and _single_token(tokenizer, post):
            return pre, post
    return None, None


def resolve_tokenizer(cfg: BuildConfig, vocab_size: int):
    """(tokenizer, processor settings) for the build, or a ValueError saying what is missing."""
    from casa.pretrained.tokenizer import ByteTokenizer, HFTokenizer

    if cfg.tokenizer == "byte":
        tok, pre, gist = ByteTokenizer(), None, "<|gist|>"
    else:
        path = Path(cfg.lm if cfg.tokenizer == "lm" else cfg.tokenizer)
        if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
            raise ValueError(f"{str(path)!r} has no tokenizer (tokenizer.json / tokenizer_config.json); "
                             "pass --tokenizer DIR, or --tokenizer byte for the built-in byte tokenizer")
        tok = HFTokenizer(path)
        pre, gist = image_tokens_from_template(tok) if tok.chat_template else (None, None)
    pre = cfg.image_prefix if cfg.image_prefix is not None else pre
    gist = cfg.gist_token if cfg.gist_token is not None else gist
    if cfg.gist and gist is None:
        raise ValueError(f"tokenizer {cfg.tokenizer if cfg.tokenizer != 'lm' else cfg.lm!r}: its chat template "
                         f"marks no image and it has none of the image tokens {list(KNOWN_IMAGE_TOKENS)}; "
                         "pass --gist-token (and --image-prefix) naming tokens of its vocabulary, or --no-gist")
    for name, token in (("image prefix", pre), ("gist token", gist if cfg.gist else None)):
        if token is not None and not _single_token(tok, token):
            raise ValueError(f"tokenizer has no single token {token!r} for the {name}")
    if tok.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the LM's vocab_size is {vocab_size}")
    return tok, {"gist": cfg.gist, "gist_token": gist or "<|gist|>", "image_prefix": pre}


# ----------------------------------------------------------------------------- model
def _dtype(cfg: BuildConfig) -> torch.dtype:
    name = cfg.dtype
    if name == "auto":
        hf = read_json(Path(cfg.lm) / "config.json")
        name = hf.get("dtype") or hf.get("torch_dtype") or (hf.get("text_config") or {}).get("dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: expected one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]


def qwen_own_vision(lm_dir, vision_dir) -> bool:
    """The paper's Qwen recipe: LM and vision tower from the same Qwen2.5-VL directory."""
    same = Path(lm_dir).resolve() == Path(vision_dir).resolve()
    return same and read_json(Path(lm_dir) / "config.json").get("model_type") == "qwen2_5_vl"


def model_config(cfg: BuildConfig) -> ModelConfig:
    from casa.vision.hf import vision_config_from_hf

    lm = lm_config_from_hf(cfg.lm)
    reduction = dict(token_reduction=cfg.token_reduction, reduction_factor=cfg.reduction_factor)
    if cfg.vision:
        size = {"image_size": cfg.image_size} if cfg.image_size else {}
        if qwen_own_vision(cfg.lm, cfg.vision):  # the merger already feeds this LM: no new projector
            size["projector"] = "identity"
        vision = vision_config_from_hf(cfg.vision, **reduction, **size)
    else:
        vision = VisionConfig(**reduction, **({"image_size": cfg.image_size} if cfg.image_size else {}))
    return ModelConfig(lm=lm, vision=vision, fusion=cfg.fusion)


def load_parts(config: ModelConfig, lm_dir, *, dtype: torch.dtype = torch.float32, device=None,
               zero_fusion_output: bool = False) -> CasaModel:
    """A CasaModel filled from the LM checkpoint `lm_dir` and, for kind="hf", the encoder's;
    with `zero_fusion_output`, its fusion output projections zeroed (`hf_lm.zero_fusion_outputs`).

    Built on the meta device and loaded lazily (see the module docstring).
    """
    from casa.core.fusion import FusionLayer
    from casa.vision.hf import load_vision_weights
    from casa.vision.tower import make_projector
    from casa.vision.vit import ViT

    model = empty_model(config)
    materialize(model, dtype=dtype, device=device)
    load_lm_weights(model, lm_dir)  # fills the LM; copies SA into fusion layers when init_from_sa
    to = dict(dtype=dtype, device=device or "cpu")
    vision = model.vision
    if config.vision.kind == "hf":
        load_vision_weights(vision.encoder, config.vision.path)
    else:
        vision.encoder = ViT(config.vision).to(**to)
    vision.projector = make_projector(config.vision, in_dim=vision.reduced_width, out_dim=config.lm.d_model).to(**to)
    if not config.fusion.init_from_sa:  # fresh fusion layers, initialised as CasaModel does
        for block in model.blocks:
            if block.fusion is not None:
                block.fusion = FusionLayer(lm=config.lm, fusion=config.fusion,
                                           own_norm=config.fusion.placement != "replace")
                block.fusion.apply(init_weights)
                block.fusion.to(**to)
    left = meta_parameters(model)
    if left:
        raise RuntimeError(f"load_parts: parameters left unloaded: {left[:10]}")
    return zero_fusion_outputs(model) if zero_fusion_output else model


def build(cfg: BuildConfig, *, device=None) -> Built:
    """Build (not save) the model, its tokenizer and processor settings."""
    config = model_config(cfg)
    tokenizer, processor = resolve_tokenizer(cfg, config.lm.vocab_size)
    model = load_parts(config, cfg.lm, dtype=_dtype(cfg), device=device, zero_fusion_output=cfg.zero_fusion_output)
    apply_freeze(model, FreezePolicy(freeze_lm=cfg.freeze_lm, vision_trainable_blocks=cfg.vision_trainable_blocks))
    return Built(model, tokenizer, processor, cfg)


def save_built(built: Built, out, *, max_shard_size="2GB", overwrite: bool = False) -> Path:
    """Save a built model as a casa model directory, its build settings in config.json's "build" section."""
    record = {k: v for k, v in asdict(built.config).items() if k != "extra"}
    record["dtype"] = str(next(built.model.parameters()).dtype).removeprefix("torch.")
    return save_pretrained(built.model, out, tokenizer=built.tokenizer, processor=built.processor,
                           extra={"build": record, **built.config.extra}, max_shard_size=max_shard_size,
                           overwrite=overwrite)


def run(cfg: BuildConfig, out, *, max_shard_size="2GB", overwrite: bool = False, quiet: bool = False) -> Path:
    """`casa build`: check the destination, build, save, print a summary."""
    from casa.pretrained.directory import parse_size

    check_model_output(out, "--out", overwrite=overwrite)
    parse_size(max_shard_size)
    built = build(cfg)
    path = save_built(built, out, max_shard_size=max_shard_size, overwrite=overwrite)
    if not quiet:
        m = built.model
        vc = m.config.vision
        rows = trainable_summary(m)
        fused = [i for i, b in enumerate(m.blocks) if b.fusion is not None]
        size = (f"dynamic resolution ({vc.min_pixels:,}..{vc.max_pixels:,} pixels, {vc.patch_size}px per token)"
                if vc.dynamic else f"{vc.image_size}px -> {m.tokens_per_image} tokens")
        print(f"built {cfg.fusion.variant} ({cfg.fusion.placement}) on blocks {fused} of {len(m.blocks)}; "
              f"vision {vc.kind} {size}; projector {vc.projector}; "
              f"{rows[-1][1]:,} of {rows[-1][2]:,} parameters trainable "
              f"(LM {'frozen' if cfg.freeze_lm else 'trainable'}, last {cfg.vision_trainable_blocks} vision blocks); "
              f"image prefix {built.processor['image_prefix']!r}, gist {built.processor['gist_token']!r}",
              file=sys.stderr)
        width = max(len(f"{r[2]:,}") for r in rows)
        for part, trainable, total in rows:
            print(f"  {part:<15} {trainable:>{width},} of {total:>{width},} trainable", file=sys.stderr)
        print(f"wrote {path}")
    return path
