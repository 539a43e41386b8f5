"""casa: vision-language fusion with CASA (Cross-Attention via Self-Attention).

The public API, by layer (each subpackage imports only those above it in
this list; see docs/design.md, "Package map"):

    config       ModelConfig = LMConfig + VisionConfig + FusionConfig
    vision       preprocessing, encoders, token reduction, projector
    core         Batch, layout (windows), attention backends, CasaModel, loss
    data         samples, processor, synthetic tasks, packing
    pretrained   HF checkpoints in/out, casa model directories, build, tokenizers
    inference    Session (text-only KV cache), generation, streaming captioner
    hub          CasaForConditionalGeneration (from_pretrained / generate / chat), export to transformers
    eval         greedy evaluation, standard benchmarks, lmms-eval plugin
    training     trainer (1 process, DDP, FSDP2), checkpoints
    study, bench the variant comparison and the benchmarks
    cli          the `casa` command

Names below are imported on first use, so `import casa` (and `casa --help`)
stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LMConfig": "casa.config", "VisionConfig": "casa.config", "FusionConfig": "casa.config",
    "ModelConfig": "casa.config",
    "Batch": "casa.core.batch", "CasaModel": "casa.core.model", "lm_loss": "casa.core.loss",
    "fusion_attend": "casa.core.attention", "causal_attend": "casa.core.attention",
    "Processor": "casa.data.processor", "Sample": "casa.data.sample",
    "save_pretrained": "casa.pretrained.directory", "from_pretrained": "casa.pretrained.directory",
    "load": "casa.pretrained.directory", "from_hf_lm": "casa.pretrained.hf_lm",
    "load_tokenizer": "casa.pretrained.tokenizer",
    "Session": "casa.inference.session", "Chat": "casa.inference.generate", "Sampling": "casa.inference.generate",
    "generate": "casa.inference.generate", "History": "casa.core.layout",
    "load_processor": "casa.pretrained.directory", "ModelInputs": "casa.data.inputs",
    "CasaForConditionalGeneration": "casa.hub.model", "export_transformers": "casa.hub.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'casa' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
