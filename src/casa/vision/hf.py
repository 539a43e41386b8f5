"""transformers vision encoders from local directories: SigLIP, CLIP, Qwen2.5-VL.

Design decisions:
- The encoder module is transformers' own class (`SiglipVisionModel`,
  `CLIPVisionModel`, `Qwen2_5_VisionTransformerPretrainedModel`) built from
  its config; weights are read by us, tensor by tensor from the memory-mapped
  safetensors files (`load_vision_weights`), so that a vision tower inside a
  full checkpoint (SigLIP's or CLIP's text tower beside it, a Qwen2.5-VL
  model's language model) costs only its own weights, in the dtype asked for.
  Both checkpoint namings are accepted: `vision_model.` / `visual.` prefixes
  (hub files, transformers 4) and the prefix-free or `model.visual.` ones.
- One output contract: `forward(pixels [N, C, S, S]) -> [N, g*g, width]` on a
  g x g grid, row-major. CLIP's CLS token is dropped; SigLIP's pooling head is
  removed (it only feeds the pooled output). Qwen2.5-VL's output is its
  merger's (2x2 patches merged, projected to `out_hidden_size`), so for it
  `VisionConfig.patch_size` is the pixel side of one *output* token (patch 14 x
  merge 2 = 28) and `d_model` is `out_hidden_size`.
- Qwen2.5-VL preprocessing is ours (numpy/torch, no torchvision): the square
  image from `vision.preprocess` is cut into 14 x 14 patches, repeated over the
  temporal patch of 2 and laid out merge-group by merge-group, exactly as
  transformers' Qwen2-VL image processor does (tested against its PIL backend).
- Dynamic resolution (`encode_items`, Qwen2.5-VL only): images and videos
  of their own sizes go through the encoder in one call, patchified by
  `vision.dynamic.patchify`; the fixed-size `forward` stays for the rest.
- A casa model directory keeps the encoder's config (not its weights, which
  are in the model's own safetensors) in `vision/` with a `casa_vision.json`
  marker; an encoder built from such a directory is structure only.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from pathlib import Path

import torch
import torch.nn as nn

from casa.config import VisionConfig, build
from casa.vision.preprocess import check_pixels
from casa.weights import (
    check_shapes,
    copy_safetensors,
    empty_parameters,
    materialize,
    weight_files,
)

__all__ = ["HF_MODEL_TYPES", "HFVisionEncoder", "MARKER", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "QWEN_DEFAULT_IMAGE_SIZE", "QWEN_MAX_PIXELS", "QWEN_MIN_PIXELS", "check_fit", "hf_vision_config", "load_vision_weights", "qwen_patchify", "structure_only", "vision_config_from_hf"]

# config.json model_type -> (family, key of the nested vision config or None)
HF_MODEL_TYPES = {
    "siglip_vision_model": ("siglip", None),
    "siglip": ("siglip", "vision_config"),
    "clip_vision_model": ("clip", None),
    "clip": ("clip", "vision_config"),
    "qwen2_5_vl_vision": ("qwen2_5_vl", None),
    "qwen2_5_vl": ("qwen2_5_vl", "vision_config"),
}
MARKER = "casa_vision.json"
QWEN_DEFAULT_IMAGE_SIZE = 448
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 28 * 28 * 1280  # transformers' Qwen2-VL image processor defaults
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_structure_only = contextvars.ContextVar("casa_vision_structure_only", default=False)


@contextlib.contextmanager
def structure_only():
    """HF encoders built in this block skip their weights (the caller fills them)."""
    token = _structure_only.set(True)
    try:
        yield
    finally:
        _structure_only.reset(token)


# ----------------------------------------------------------------------------- configs
def _classes(family: str):
    if family == "siglip":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        return SiglipVisionConfig, SiglipVisionModel
    if family == "clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        return CLIPVisionConfig, CLIPVisionModel
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLVisionConfig,
    )
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    return Qwen2_5_VLVisionConfig, Qwen2_5_VisionTransformerPretrainedModel


def _read_json(file: Path, who: str) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{who}: cannot read {str(file)!r}: {e}") from e


def hf_vision_config(path):
    """(family, transformers vision config) of the checkpoint or casa vision directory `path`."""
    path = Path(path)
    raw = _read_json(path / "config.json", "HF vision model")
    if (path / MARKER).is_file():
        family, key = _read_json(path / MARKER, "HF vision model")["family"], None
    else:
        model_type = raw.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f"HF vision model in {str(path)!r}: model_type={model_type!r} is not supported; "
                             f"expected one of {sorted(HF_MODEL_TYPES)}")
        family, key = HF_MODEL_TYPES[model_type]
    sub = raw.get(key) or {} if key else raw
    config_cls, _ = _classes(family)
    sub = {k: v for k, v in sub.items() if k not in ("model_type", "transformers_version", "architectures")}
    return family, config_cls(**sub)


def _native(family: str, hf) -> dict:
    """What the checkpoint fixes, in VisionConfig terms."""
    if family == "qwen2_5_vl":
        return dict(patch_size=hf.patch_size * hf.spatial_merge_size, channels=hf.in_channels,
                    d_model=hf.out_hidden_size)
    return dict(image_size=hf.image_size, patch_size=hf.patch_size, channels=hf.num_channels, d_model=hf.hidden_size)


def vision_config_from_hf(path, **overrides) -> VisionConfig:
    """A VisionConfig(kind="hf") filled from `path`/config.json (+ preprocessor_config.json).

    For Qwen2.5-VL, whose resolution is free, images keep their own size
    (dynamic resolution: `min_pixels` / `max_pixels` from the processor
    config, `vision/dynamic.py`) unless `image_size` is given, which must be a
    multiple of patch x merge (28) and fixes every image at that square size.
    """
    path = str(path)
    family, hf = hf_vision_config(path)
    depth = hf.depth if family == "qwen2_5_vl" else hf.num_hidden_layers
    heads = hf.num_heads if family == "qwen2_5_vl" else hf.num_attention_heads
    values = dict(kind="hf", path=path, n_layers=depth, n_heads=heads, d_ff=hf.intermediate_size, **_native(family, hf))
    if family == "qwen2_5_vl":
        values.update(image_size=QWEN_DEFAULT_IMAGE_SIZE, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    pre_file = Path(path) / "preprocessor_config.json"
    if pre_file.exists():
        pre = _read_json(pre_file, "vision_config_from_hf")
        for key in ("image_mean", "image_std"):
            if key in pre:
                values[key] = tuple(pre[key])
        if family == "qwen2_5_vl":
            side = pre.get("patch_size", hf.patch_size) * pre.get("merge_size", hf.spatial_merge_size)
            if side != values["patch_size"]:
                raise ValueError(f"vision_config_from_hf: {str(pre_file)!r} merges {side}-pixel tokens but the "
                                 f"model in {path!r} makes {values['patch_size']}-pixel ones")
        else:  # the model's position embeddings fix the input size; the processor must agree
            size = pre.get("crop_size") if pre.get("do_center_crop") else pre.get("size")
            if isinstance(size, dict):
                size = size.get("height", size.get("shortest_edge"))
            if isinstance(size, int) and size != hf.image_size:
                raise ValueError(f"vision_config_from_hf: {str(pre_file)!r} resizes to {size} but the model in "
                                 f"{path!r} expects image_size={hf.image_size}")
    if family == "qwen2_5_vl" and "image_size" not in overrides:  # Qwen's own dynamic resolution
        values.update(_qwen_pixels(Path(path) / "preprocessor_config.json"))
    values.update(overrides)
    return build(VisionConfig, values, "vision_config_from_hf")


def _qwen_pixels(pre_file: Path) -> dict:
    """min_pixels / max_pixels of a Qwen2-VL image processor config (transformers' defaults without one)."""
    pre = _read_json(pre_file, "vision_config_from_hf") if pre_file.exists() else {}
    size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
    lo = pre.get("min_pixels", size.get("shortest_edge", QWEN_MIN_PIXELS))
    hi = pre.get("max_pixels", size.get("longest_edge", QWEN_MAX_PIXELS))
    return {"min_pixels": lo, "max_pixels": hi}


def check_fit(cfg: VisionConfig, family: str, hf, where: str) -> None:
    """ValueError naming every VisionConfig field that the checkpoint contradicts."""
    native = _native(family, hf)
    mine = {k: getattr(cfg, k) for k in native}
    bad = {k: (mine[k], native[k]) for k in native if mine[k] != native[k]}
    if bad:
        raise ValueError(f"HFVisionEncoder: VisionConfig disagrees with {where!r} (config, checkpoint): {bad}; "
                         "build the config with vision_config_from_hf")
    if family == "qwen2_5_vl" and cfg.image_size % cfg.patch_size:
        raise ValueError(f"HFVisionEncoder: image_size={cfg.image_size} is not a multiple of {cfg.patch_size} "
                         f"(Qwen2.5-VL patch {hf.patch_size} x merge {hf.spatial_merge_size}) for {where!r}")


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# ----------------------------------------------------------------------------- patchify
def qwen_patchify(pixels: torch.Tensor, *, patch: int, merge: int, temporal: int):
    """[N, C, H, W] -> (flat patches [N*gh*gw, C*temporal*patch*patch], grid_thw [N, 3]).

    Patches are ordered merge group by merge group (the order Qwen2.5-VL's
    merger expects) and each still image is repeated over the temporal patch.
    """
    n, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(n, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # n, gh/m, gw/m, m, m, c, p, p
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.long, device=pixels.device)
    return x.reshape(n * gh * gw, c * temporal * patch * patch), grid


# ----------------------------------------------------------------------------- encoder
class HFVisionEncoder(nn.Module):
    """A SigLIP / CLIP / Qwen2.5-VL vision model from local directory `cfg.path`.

    `load_weights=None` loads them unless inside `structure_only()` or when
    `cfg.path` is a casa model's vision directory. Weights load in float32;
    cast the model afterwards (or use `casa.build`, which loads in any dtype).
    """

    def __init__(self, cfg: VisionConfig, *, load_weights: bool | None = None):
        super().__init__()
        if not cfg.path:
            raise ValueError("HFVisionEncoder: VisionConfig.path is not set (a local model directory)")
        self.cfg = cfg
        self.family, self.hf_config = hf_vision_config(cfg.path)
        check_fit(cfg, self.family, self.hf_config, cfg.path)
        casa_dir = (Path(cfg.path) / MARKER).is_file()
        if load_weights is None:
            load_weights = not (_structure_only.get() or casa_dir)
        if load_weights and casa_dir:
            raise ValueError(f"HFVisionEncoder: {cfg.path!r} holds a casa model's vision config, not weights; "
                             "load the model with casa.pretrained.from_pretrained")
        _, model_cls = _classes(self.family)
        with _quiet_transformers(), (empty_parameters() if load_weights else contextlib.nullcontext()):
            model = model_cls(self.hf_config)
        model = getattr(model, "vision_model", model)  # transformers 4 wraps the transformer
        if getattr(model, "use_head", False):  # SigLIP's pooling head: only feeds pooler_output
            model.use_head = False
            del model.head
        self.model = model
        self.n_prefix = 1 if self.family == "clip" else 0  # CLIP's CLS token
        if load_weights:
            materialize(self.model, dtype=torch.float32)
            load_vision_weights(self, cfg.path)

    @property
    def out_width(self) -> int:
        return self.cfg.d_model

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks if self.family == "qwen2_5_vl" else self.model.encoder.layers

    def tail_modules(self) -> list[nn.Module]:
        """Modules after the last block on the way to the output (trained with the last blocks)."""
        if self.family == "qwen2_5_vl":
            return [self.model.merger]
        return [self.model.post_layernorm] if self.family == "siglip" else []  # CLIP's only sees CLS

    def save_config(self, path) -> None:
        """Write this encoder's transformers config (no weights) as a casa vision directory."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(self.hf_config.to_json_string())
        (path / MARKER).write_text(json.dumps({"family": self.family, "weights": "../model.safetensors"}) + "\n")

    def checkpoint_targets(self, names, where: str) -> dict[str, torch.Tensor]:
        """Checkpoint tensor name -> our parameter; ValueError on missing / unexpected vision tensors."""
        qwen = self.family == "qwen2_5_vl"
        anchor = "patch_embed.proj.weight" if qwen else "embeddings.patch_embedding.weight"
        prefixes = ("visual.", "model.visual.") if qwen else ("vision_model.", "", "model.vision_model.")
        names = set(names)
        prefix = next((p for p in prefixes if p + anchor in names), None)
        if prefix is None:
            raise ValueError(f"{where}: no {self.family} vision tensors in the checkpoint "
                             f"(looked for {[p + anchor for p in prefixes]})")
        targets = {prefix + n: p for n, p in self.model.named_parameters()}
        theirs = {k for k in names if k.startswith(prefix)}
        ignored = {k for k in theirs if k[len(prefix):].startswith("head.") or k.endswith("position_ids")}
        if not prefix:  # a vision-only checkpoint: every tensor is ours
            ignored |= {k for k in theirs if k.endswith("rotary_pos_emb.inv_freq")}
        missing, unexpected = sorted(set(targets) - theirs), sorted(theirs - set(targets) - ignored)
        if missing or unexpected:
            raise ValueError(f"{where}: vision checkpoint does not match the {self.family} encoder; "
                             f"missing tensors: {missing[:10]} ({len(missing)} in all); "
                             f"unexpected tensors: {unexpected[:10]} ({len(unexpected)} in all)")
        return targets

    def encode_items(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        """Qwen2.5-VL at dynamic resolution (`vision.dynamic`): images `[C, H, W]` and videos
        `[F, C, H, W]` (H, W multiples of patch x merge) in one call of the encoder.

        Returns:
            per item, `[gt * gh * gw, width]` tokens in the merger's order (frame, row, column).
        """
        from casa.vision.dynamic import patchify

        if self.family != "qwen2_5_vl":
            raise ValueError(f"HFVisionEncoder: {self.family} has a fixed input size; dynamic resolution is "
                             "Qwen2.5-VL's")
        hf, side = self.hf_config, self.cfg.patch_size
        dtype = self.model.patch_embed.proj.weight.dtype
        for i, item in enumerate(items):
            if item.dim() not in (3, 4) or item.shape[-3] != self.cfg.channels or item.shape[-1] % side \
                    or item.shape[-2] % side or not item.is_floating_point():
                raise ValueError(f"HFVisionEncoder: item {i} has shape {tuple(item.shape)} ({item.dtype}), expected "
                                 f"floats [C={self.cfg.channels}, H, W] or [F, C, H, W], H and W multiples of {side}")
        parts = [patchify(x.to(dtype), patch=hf.patch_size, merge=hf.spatial_merge_size,
                          temporal=hf.temporal_patch_size) for x in items]
        flat = torch.cat([p for p, _ in parts])
        grid = torch.stack([g for _, g in parts]).to(flat.device)
        out = self.model(hidden_states=flat, grid_thw=grid).pooler_output
        counts = (grid.prod(-1) // hf.spatial_merge_size ** 2).tolist()
        return list(out.split(counts))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, C, S, S] -> [N, grid*grid, width]."""
        check_pixels(pixels, self.cfg, "HFVisionEncoder")
        if self.family == "qwen2_5_vl":
            hf = self.hf_config
            dtype = self.model.patch_embed.proj.weight.dtype
            flat, grid = qwen_patchify(pixels.to(dtype), patch=hf.patch_size, merge=hf.spatial_merge_size,
                                       temporal=hf.temporal_patch_size)
            out = self.model(hidden_states=flat, grid_thw=grid).pooler_output
            return out.reshape(pixels.shape[0], -1, out.shape[-1])
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        x = self.model(pixel_values=pixels.to(dtype)).last_hidden_state
        return x[:, self.n_prefix:]


def load_vision_weights(encoder: HFVisionEncoder, path) -> HFVisionEncoder:
    """Fill `encoder` from the safetensors checkpoint in `path`, after checking names and shapes."""
    where = f"load_vision_weights({str(path)!r})"
    files = weight_files(path)
    targets = encoder.checkpoint_targets(files, where)
    check_shapes(targets, files, where)
    copy_safetensors(targets, files)
    return encoder
