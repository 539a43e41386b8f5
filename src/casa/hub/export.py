"""`casa export --format transformers`: a casa model directory as a transformers one.

The result loads where casa is not installed:
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` (or
`AutoModel`), `AutoTokenizer` and `AutoProcessor` likewise, and its
`generate` gives casa's greedy tokens (tests/test_export.py: casa, ca and
insertion, on a Llama- and a Qwen2-shaped LM, images and text).

Layout of OUT:
- `config.json`: `model_type: "casa"`, casa's `lm` / `vision` / `fusion`
  sections as they are, `auto_map` naming the remote-code classes;
- `configuration_casa.py`, `modeling_casa.py`, `processing_casa.py`: copied
  from `casa/hub/remote/`, self-contained (torch + transformers);
- `model.safetensors`: casa's state dict under casa's names, `lm_head.weight`
  stored even when tied (transformers' tying rules differ across versions);
- `generation_config.json`: the processor's stop tokens as `eos_token_id`;
- the tokenizer: an HF tokenizer as it is; casa's byte tokenizer as a
  `tokenizers` byte-level tokenizer with the same ids (bytes 0-255, then the
  special tokens) and casa's chat template in jinja
  (`data.processor.BUILTIN_CHAT_TEMPLATE`);
- `processor_config.json`: image size, mean, std and the image markers.

Design decisions:
- What the exported modeling file does not implement is refused before
  anything is written, naming it: transformers vision towers (SigLIP, CLIP,
  Qwen2.5-VL), dynamic resolution, multimodal RoPE. A directory without a
  tokenizer is refused too (an export carries its tokenizer and processor).
- The output is written atomically and replaces only an earlier export, and
  only with `overwrite` (`casa.files.check_replaceable_dir`).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from safetensors.torch import save_file

from casa.config import ModelConfig
from casa.data.processor import BUILTIN_CHAT_TEMPLATE
from casa.files import atomic_directory, check_replaceable_dir
from casa.hub.export_dir import is_transformers_export
from casa.pretrained.directory import from_pretrained, load_processor, model_config
from casa.pretrained.runs import resolve_model_dir
from casa.pretrained.tokenizer import ByteTokenizer, has_tokenizer

__all__ = ["AUTO_MAP", "REMOTE_FILES", "check_exportable", "export_transformers"]

REMOTE_FILES = ("configuration_casa.py", "modeling_casa.py", "processing_casa.py")
_CLASS = "modeling_casa.CasaForConditionalGeneration"
AUTO_MAP = {"AutoConfig": "configuration_casa.CasaConfig", "AutoModel": _CLASS, "AutoModelForCausalLM": _CLASS,
            "AutoModelForImageTextToText": _CLASS, "AutoProcessor": "processing_casa.CasaProcessor"}


def check_exportable(config: ModelConfig, where: str) -> None:
    """ValueError naming what the exported modeling file does not implement."""
    vc = config.vision
    problems = []
    if vc.kind != "vit":
        problems.append(f"vision.kind={vc.kind!r} (a transformers vision tower; only casa's built-in ViT is exported)")
    if vc.dynamic:
        problems.append("dynamic resolution (vision.min_pixels / max_pixels)")
    if config.lm.mrope_section is not None:
        problems.append("multimodal RoPE (lm.mrope_section, a Qwen2.5-VL LM)")
    if config.fusion.frame_memory:
        problems.append(f"frame memory (fusion.frame_memory={config.fusion.frame_memory})")
    if problems:
        raise ValueError(f"{where}: cannot export to transformers: {'; '.join(problems)}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which a byte-level `tokenizers` tokenizer reads."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_tokenizer(tok: ByteTokenizer):
    """casa's byte tokenizer as a transformers fast tokenizer with the same ids and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tok.specials])
    names = {k: v for k, v in (("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>"))
             if v in tok.specials}
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, **names)
    fast.chat_template = BUILTIN_CHAT_TEMPLATE
    return fast


def export_transformers(model_dir, out, *, overwrite: bool = False) -> Path:
    """Write the casa model at `model_dir` (a model directory or a run) as a transformers
    directory `out` (module docstring); returns `out`."""
    path = resolve_model_dir(model_dir)
    where = f"export {str(model_dir)!r}"
    config = model_config(path)
    check_exportable(config, where)
    if not has_tokenizer(path):
        raise ValueError(f"{where}: the model was saved without a tokenizer; an export carries its tokenizer and "
                         "processor: save it with one (casa.save_pretrained(model, dir, tokenizer=...))")
    out = check_replaceable_dir(out, "export", overwrite=overwrite, recognise=is_transformers_export,
                                kind="transformers export")
    processor = load_processor(path)
    model = from_pretrained(path)
    tensors = {n: t.detach().cpu().contiguous().clone() for n, t in model.state_dict().items()}
    dtype = str(model.embed.weight.dtype).removeprefix("torch.")
    settings = {"image_size": config.vision.image_size, "channels": config.vision.channels,
                "image_mean": list(config.vision.image_mean), "image_std": list(config.vision.image_std),
                "gist_token": processor.gist, "image_prefix": processor.image_prefix}
    stops = sorted(processor.stop_ids)
    hf_config = {"model_type": "casa", "architectures": ["CasaForConditionalGeneration"], "auto_map": AUTO_MAP,
                 "casa_export": {"format": "transformers", "source": str(path)}, **config.to_dict(),
                 "processor": settings, "eos_token_id": stops, "pad_token_id": processor.tok.pad_id, "dtype": dtype}
    generation = {"eos_token_id": stops, "pad_token_id": processor.tok.pad_id}
    with atomic_directory(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "processor_config.json").write_text(json.dumps(
            {**settings, "auto_map": {"AutoProcessor": AUTO_MAP["AutoProcessor"]}}, indent=2) + "\n")
        remote = resources.files("casa.hub") / "remote"
        for name in REMOTE_FILES:
            (tmp / name).write_text((remote / name).read_text(encoding="utf-8"), encoding="utf-8")
        tok = processor.tok
        (_byte_tokenizer(tok) if isinstance(tok, ByteTokenizer) else tok.tok).save_pretrained(str(tmp))
    return out
