"""Hugging Face causal-LM checkpoints (Llama / Qwen2 / Mistral) in and out of CasaModel.

Design decisions:
- No transformers import: `config.json` is read as JSON and the weights with
  safetensors (memory-mapped, `casa.weights`), so loading needs only the core
  dependencies.
- Strict, like `ModelConfig`: a checkpoint feature we do not implement
  (rope scaling, sliding window, non-SiLU MLP, biases our layers lack) is a
  ValueError naming it, never a silently different model.
- `load_lm_weights` checks everything first (names, then shapes read from the
  safetensors headers) and only then copies, tensor by tensor from the
  memory-mapped files, into the existing parameters: a failed load leaves the
  model untouched and the peak extra memory is one tensor.
- Only LM parameters are mapped; the vision tower and the fusion layers are
  not in a text checkpoint. Fusion layers are re-initialised from the loaded
  SA when `fusion.init_from_sa` is set. `zero_fusion_output` (a build
  option, not part of `ModelConfig`: it says how the weights start, not what
  the model is) zeroes their output projections so that a built model
  equals its LM at step 0.
- A Qwen2.5-VL directory also serves as an LM: its text model is a Qwen2
  decoder with M-RoPE, whose `mrope_section` the LMConfig keeps (positions
  are `core/positions.py`'s business). Its `visual.` tensors are
  skipped here (`hf_vision` reads them); both tensor namings are accepted
  (`model.layers.` as on the hub, `model.language_model.layers.`).
- Every safetensors file is opened through `casa.weights.open_safetensors`,
  so a truncated shard is an error naming it.
- `save_lm_as_hf` writes its directory atomically and replaces only a
  Hugging Face checkpoint, and only with `overwrite=True`
  (`casa.files.check_replaceable_dir`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from casa.config import FusionConfig, LMConfig, ModelConfig, VisionConfig
from casa.core.model import CasaModel
from casa.files import atomic_directory, check_replaceable_dir, read_json
from casa.pretrained.build_config import check_zero_fusion_output
from casa.weights import (
    by_file,
    check_shapes,
    copy_safetensors,
    open_safetensors,
    weight_files,
)

__all__ = ["SUPPORTED_ARCHITECTURES", "from_hf_lm", "is_hf_checkpoint", "lm_checkpoint_layout", "lm_config_from_hf",
           "load_hf_state_dict", "load_lm_weights", "save_lm_as_hf", "zero_fusion_outputs"]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM",
                           "Qwen2_5_VLForConditionalGeneration")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
_VL = "Qwen2_5_VLForConditionalGeneration"
_VISUAL_PREFIXES = ("visual.", "model.visual.")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


# ----------------------------------------------------------------------------- config
def _read_config(path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r}: no config.json (expected a Hugging Face model directory)")
    config = read_json(file)
    if not isinstance(config, dict):
        raise ValueError(f"{str(file)!r}: expected a JSON object, got {type(config).__name__}")
    return config


def _rope_theta(hf: dict, where: str, *, mrope_ok: bool = False) -> float:
    """transformers 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`.
    `mrope_ok`: M-RoPE is accepted (its sections are read by `_mrope_section`)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type layout
        params = params["full_attention"]
    if not isinstance(params, dict):
        params = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type"))
    if mrope_ok and rope_type == "mrope":
        rope_type = None
    if rope_type not in (None, "default"):
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (only default RoPE)")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def _mrope_section(hf: dict, where: str) -> list[int]:
    """Qwen2.5-VL's frequencies per (t, h, w) position component (transformers' default [16, 24, 24])."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if isinstance(params, dict) and "full_attention" in params:
        params = params["full_attention"]
    section = params.get("mrope_section", [16, 24, 24]) if isinstance(params, dict) else [16, 24, 24]
    if not (isinstance(section, list) and len(section) == 3 and all(isinstance(x, int) for x in section)):
        raise ValueError(f"{where}: mrope_section={section!r}: expected 3 whole numbers")
    return section


def lm_config_from_hf(path) -> LMConfig:
    """An LMConfig matching `path`/config.json (Llama, Qwen2, Mistral, or Qwen2.5-VL's text model)."""
    hf = _read_config(path)
    where = f"lm_config_from_hf({str(path)!r})"
    archs = hf.get("architectures") or [_MODEL_TYPES.get(hf.get("model_type"), hf.get("model_type"))]
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{where}: architecture {arch!r} is not supported; expected one of {SUPPORTED_ARCHITECTURES}")
    top = hf
    if arch == _VL:  # the text model's fields: nested (transformers 5) or flat (hub files)
        hf = {**{k: v for k, v in top.items() if k != "text_config"}, **(top.get("text_config") or {})}
        hf["tie_word_embeddings"] = top.get("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (only 'silu')")
    if arch == "LlamaForCausalLM":
        if hf.get("mlp_bias"):
            raise ValueError(f"{where}: mlp_bias=true is not supported")
        if hf.get("attention_bias"):  # Llama puts it on o_proj too, which our Attention lacks
            raise ValueError(f"{where}: attention_bias=true is not supported (o_proj has no bias here)")
    if arch == "MistralForCausalLM" and hf.get("sliding_window") is not None:
        raise ValueError(f"{where}: sliding_window={hf['sliding_window']} is not supported "
                         "(set it to null if your sequences never exceed it)")
    sliding = hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or [])
    if arch in ("Qwen2ForCausalLM", _VL) and sliding:
        raise ValueError(f"{where}: sliding-window attention (use_sliding_window / layer_types) is not supported")
    heads = hf["num_attention_heads"]
    return LMConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),
        d_ff=hf["intermediate_size"],
        rope_theta=_rope_theta(hf, where, mrope_ok=arch == _VL),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=arch in ("Qwen2ForCausalLM", _VL),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        mrope_section=_mrope_section(hf, where) if arch == _VL else None,
    )


# ----------------------------------------------------------------------------- weights
def _load_tensor(files: dict[str, Path], name: str) -> torch.Tensor:
    with open_safetensors(files[name]) as f:
        return f.get_tensor(name)


def load_hf_state_dict(path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory (single file or sharded), on the CPU."""
    files = weight_files(path)
    out = {}
    for file, names in by_file(files, files).items():
        with open_safetensors(file) as f:
            out.update({n: f.get_tensor(n) for n in names})
    return out


def _lm_parameters(model: CasaModel, prefix: str = "model.") -> dict[str, nn.Parameter]:
    """HF name -> our LM parameter (the two layouts differ only in prefixes)."""
    out = {prefix + "embed_tokens.weight": model.embed.weight, prefix + "norm.weight": model.norm.weight}
    for i, b in enumerate(model.blocks):
        p = f"{prefix}layers.{i}."
        out[p + "input_layernorm.weight"] = b.input_layernorm.weight
        out[p + "post_attention_layernorm.weight"] = b.post_attention_layernorm.weight
        out.update({p + "self_attn." + n: t for n, t in b.attn.named_parameters()})
        out.update({p + "mlp." + n: t for n, t in b.mlp.named_parameters()})
    if model.lm_head.weight is not model.embed.weight:
        out["lm_head.weight"] = model.lm_head.weight
    return out


def lm_checkpoint_layout(path, names) -> tuple[str, set[str]]:
    """(prefix of the decoder's tensors, checkpoint tensors that are not the LM's business)."""
    prefix = "model.language_model." if "model.language_model.embed_tokens.weight" in names else "model."
    skip = {n for n in names if n.endswith(_IGNORED_SUFFIXES)}
    arch = (_read_config(path).get("architectures") or [None])[0]
    if arch == _VL or prefix != "model.":
        skip |= {n for n in names if n.startswith(_VISUAL_PREFIXES)}
    return prefix, skip


def load_lm_weights(model: CasaModel, path, *, dtype: torch.dtype | None = None) -> CasaModel:
    """Copy a HF checkpoint into `model`'s LM parameters, in place; returns `model`.

    `dtype`, if given, casts the whole model first; otherwise tensors are cast to
    the parameters' dtype. A tied model accepts a stored `lm_head.weight` only if
    it equals the embeddings.
    """
    where = f"load_lm_weights({str(path)!r})"
    files = weight_files(path)
    prefix, skip = lm_checkpoint_layout(path, files)
    params = _lm_parameters(model, prefix)
    names = [n for n in files if n not in skip]
    tied = model.lm_head.weight is model.embed.weight
    extra_head = tied and "lm_head.weight" in files
    missing = sorted(set(params) - set(names))
    unexpected = sorted(set(names) - set(params) - ({"lm_head.weight"} if extra_head else set()))
    if missing or unexpected:
        raise ValueError(f"{where}: checkpoint does not match the model; "
                         f"missing HF tensors: {missing}; unexpected HF tensors: {unexpected}")
    check_shapes(params, files, where)
    if extra_head:
        head = _load_tensor(files, "lm_head.weight")
        if not torch.equal(head, _load_tensor(files, prefix + "embed_tokens.weight")):
            raise ValueError(f"{where}: the model ties lm_head to the embeddings "
                             f"but the checkpoint's lm_head.weight differs from {prefix}embed_tokens.weight")
    if dtype is not None:
        model.to(dtype)
        params = _lm_parameters(model, prefix)  # robust to `to()` replacing parameter objects
    copy_safetensors(params, files)
    if model.config.fusion.init_from_sa:
        model.init_fusion_from_sa()
    return model


def zero_fusion_outputs(model: CasaModel) -> CasaModel:
    """Zero every fusion layer's output projection (and keep gated_ca's gates closed), in place:
    a fusion layer then adds exactly nothing, so with `parallel` or `before` placement the model
    equals its LM on any input at step 0, while its q/k/v keep their init (copies of the block's
    SA with `init_from_sa`), from which training starts. Refused for the shared variants and
    `replace` (`check_zero_fusion_output`)."""
    check_zero_fusion_output(model.config.fusion, "zero_fusion_outputs")
    with torch.no_grad():
        for block in model.blocks:
            if block.fusion is not None:
                block.fusion.attn.o_proj.weight.zero_()
    return model


def from_hf_lm(path, *, vision: VisionConfig | None = None, fusion: FusionConfig | None = None,
               dtype: torch.dtype | None = None, zero_fusion_output: bool = False) -> CasaModel:
    """A CasaModel whose LM is the HF checkpoint at `path`; text-only (`insertion`) by default.

    Fusion layers start as copies of their block's SA (`fusion.init_from_sa`): `casa` in
    `parallel` or `before` placement then differs from the LM even on text alone (the copy
    adds to SA). `zero_fusion_output=True` zeroes their output projections so that the model
    equals the LM exactly at step 0 (`zero_fusion_outputs`).
    """
    fusion = fusion or FusionConfig(variant="insertion")
    if zero_fusion_output:
        check_zero_fusion_output(fusion, f"from_hf_lm({str(path)!r})")
    config = ModelConfig(lm=lm_config_from_hf(path), vision=vision or VisionConfig(), fusion=fusion)
    model = load_lm_weights(CasaModel(config), path, dtype=dtype)
    return zero_fusion_outputs(model) if zero_fusion_output else model


# ----------------------------------------------------------------------------- export
def is_hf_checkpoint(path) -> bool:
    """Whether `path` looks like a Hugging Face checkpoint directory (config.json + safetensors weights)."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("model*.safetensors*"))


def save_lm_as_hf(model: CasaModel, path, *, overwrite: bool = False) -> Path:
    """Write the LM as a HF checkpoint: config.json + model.safetensors; returns the directory.

    Layout `LlamaForCausalLM`, or `Qwen2ForCausalLM` when the LM has qkv biases
    (Llama's `attention_bias` would also bias o_proj). Vision and fusion
    weights are not written. An existing HF checkpoint at `path` is replaced
    only with `overwrite`; any other non-empty folder is refused.
    """
    lm = model.config.lm
    arch = "Qwen2ForCausalLM" if lm.qkv_bias else "LlamaForCausalLM"
    dtype = str(model.embed.weight.dtype).removeprefix("torch.")
    config = {
        "architectures": [arch],
        "model_type": "qwen2" if lm.qkv_bias else "llama",
        "vocab_size": lm.vocab_size,
        "hidden_size": lm.d_model,
        "num_hidden_layers": lm.n_layers,
        "num_attention_heads": lm.n_heads,
        "num_key_value_heads": lm.n_kv_heads,
        "head_dim": lm.head_dim,
        "intermediate_size": lm.d_ff,
        "hidden_act": "silu",
        "rms_norm_eps": lm.norm_eps,
        "rope_theta": lm.rope_theta,
        "rope_parameters": {"rope_theta": lm.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": lm.tie_embeddings,
        "dtype": dtype,
    }
    config.update({"use_sliding_window": False, "sliding_window": None} if lm.qkv_bias
                  else {"attention_bias": False, "mlp_bias": False})
    out = check_replaceable_dir(path, "save_lm_as_hf", overwrite=overwrite, recognise=is_hf_checkpoint,
                                kind="Hugging Face checkpoint")
    tensors = {n: p.detach().cpu().contiguous() for n, p in _lm_parameters(model).items()}
    with atomic_directory(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
