"""The configuration of a casa model exported for transformers (`casa export --format transformers`).

This file is copied verbatim into the exported directory and loaded by
transformers' remote code (`trust_remote_code=True`): it imports only
transformers. It keeps casa's three config sections as they are (`lm`,
`vision`, `fusion`: see casa's `ModelConfig`) and mirrors the sizes
transformers' generation and caches read under their usual names.
"""

from transformers import PretrainedConfig

__all__ = ["CasaConfig"]


class CasaConfig(PretrainedConfig):
    model_type = "casa"

    def __init__(self, lm: dict | None = None, vision: dict | None = None, fusion: dict | None = None,
                 processor: dict | None = None, **kwargs):
        self.lm = dict(lm or {})
        self.vision = dict(vision or {})
        self.fusion = dict(fusion or {})
        self.processor = dict(processor or {})  # gist / gist_token / image_prefix (the image markers)
        lm = self.lm
        self.vocab_size = lm.get("vocab_size", 256)
        self.hidden_size = lm.get("d_model", 128)
        self.intermediate_size = lm.get("d_ff", 352)
        self.num_hidden_layers = lm.get("n_layers", 4)
        self.num_attention_heads = lm.get("n_heads", 4)
        self.num_key_value_heads = lm.get("n_kv_heads", self.num_attention_heads)
        self.head_dim = lm.get("head_dim") or self.hidden_size // self.num_attention_heads
        self.rms_norm_eps = lm.get("norm_eps", 1e-6)
        self.rope_theta = lm.get("rope_theta", 10000.0)
        kwargs["tie_word_embeddings"] = False  # lm_head is stored on its own (equal to the embeddings if tied)
        super().__init__(**kwargs)
