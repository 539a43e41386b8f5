"""The vision-language model: a Llama-style decoder whose chosen blocks carry a
fusion layer, plus a vision tower.

Data flow for every variant but `insertion`: image tokens `[N_tok, d]` stay
outside the text stream; each fusion block turns them into keys/values (once
per block and forward) that text queries read through `fusion_attend`.
`ca_ffn` also updates the image tokens with every block's FFN. `insertion`
splices image tokens into the stream and runs plain causal self-attention
per document; positions then count image tokens too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from casa.config import FusionConfig, LMConfig, ModelConfig
from casa.core.batch import Batch
from casa.core.fusion import FusionLayer
from casa.core.layout import Layout
from casa.core.lm import MLP, Attention, RMSNorm, Rotary
from casa.vision.tower import VisionTower


@dataclass
class Context:
    """What every block needs for one forward, computed once."""

    layout: Layout
    rotary: Rotary  # text positions
    image_rotary: Rotary | None  # one position per image token (its insertion point)
    backend: str


class Block(nn.Module):
    def __init__(self, *, lm: LMConfig, fusion: FusionConfig | None):
        super().__init__()
        self.n1 = RMSNorm(lm.d_model, eps=lm.norm_eps)
        self.attn = Attention(d_model=lm.d_model, n_heads=lm.n_heads, n_kv_heads=lm.n_kv_heads,
                              head_dim=lm.head_dim, qkv_bias=lm.qkv_bias)
        self.n2 = RMSNorm(lm.d_model, eps=lm.norm_eps)
        self.mlp = MLP(d_model=lm.d_model, d_ff=lm.d_ff)
        self.placement = fusion.placement if fusion is not None else None
        self.fusion = None
        if fusion is not None:
            self.fusion = FusionLayer(lm=lm, fusion=fusion, own_norm=fusion.placement != "replace")

    def fusion_norm(self) -> nn.Module:
        return self.n1 if self.placement == "replace" else self.fusion.norm

    def self_attention(self, h, ctx: Context):
        return self.attn(self.n1(h), rotary=ctx.rotary, layout=ctx.layout, backend=ctx.backend)

    def cross(self, h, image_kv, ctx: Context):
        return self.fusion(h, image_kv, norm=self.fusion_norm(), sa=self.attn, rotary=ctx.rotary,
                           layout=ctx.layout, backend=ctx.backend)

    def forward(self, h, image_tokens, ctx: Context, *, update_images: bool = False):
        if self.fusion is None:
            h = h + self.self_attention(h, ctx)
        else:
            kv = self.fusion.image_kv(image_tokens, norm=self.fusion_norm(), sa=self.attn,
                                      image_rotary=ctx.image_rotary)
            if self.placement == "parallel":
                h = h + self.self_attention(h, ctx) + self.cross(h, kv, ctx)
            elif self.placement == "before":
                h = h + self.cross(h, kv, ctx)
                h = h + self.self_attention(h, ctx)
            else:  # replace
                h = h + self.cross(h, kv, ctx)
        h = h + self.mlp(self.n2(h))
        if update_images:
            image_tokens = image_tokens + self.mlp(self.n2(image_tokens))
        return h, image_tokens

    def step(self, h, *, rotary: Rotary, sa_cache, window, backend: str):
        """Incremental `forward` of new tokens `h: [1, t, d]` against this block's
        SA cache and fusion window state (both `cache.KVCache`; see session.py)."""

        def sa(x):
            return self.attn.step(self.n1(x), rotary=rotary, cache=sa_cache, backend=backend)

        def cross(x):
            return self.fusion.step(x, window, norm=self.fusion_norm(), sa=self.attn, rotary=rotary,
                                    backend=backend)

        if self.fusion is None:
            h = h + sa(h)
        elif self.placement == "parallel":
            h = h + sa(h) + cross(h)
        elif self.placement == "before":
            h = h + cross(h)
            h = h + sa(h)
        else:  # replace
            h = h + cross(h)
        return h + self.mlp(self.n2(h))


class CasaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        lm, fusion = config.lm, config.fusion
        self.vision = VisionTower(config.vision, lm_d_model=lm.d_model)
        self.embed = nn.Embedding(lm.vocab_size, lm.d_model)
        fusion_layers = set(fusion.fusion_layers(lm.n_layers))
        self.blocks = nn.ModuleList(
            Block(lm=lm, fusion=fusion if i in fusion_layers else None) for i in range(lm.n_layers)
        )
        self.norm = RMSNorm(lm.d_model, eps=lm.norm_eps)
        self.lm_head = nn.Linear(lm.d_model, lm.vocab_size, bias=False)
        for module in (self.embed, self.blocks, self.lm_head):
            module.apply(_init_weights)
        if lm.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if fusion.init_from_sa:
            self.init_fusion_from_sa()

    # ------------------------------------------------------------ helpers
    @property
    def tokens_per_image(self) -> int:
        return self.config.vision.tokens_per_image

    def init_fusion_from_sa(self) -> None:
        """Copy each block's SA (and norms) into its fusion layer; call again
        after loading pretrained LM weights."""
        with torch.no_grad():
            for block in self.blocks:
                if block.fusion is not None:
                    block.fusion.init_from_block(block)

    def fusion_parameters(self):
        """Parameters that exist only because of fusion (the 'new' ones)."""
        return [p for b in self.blocks if b.fusion is not None for p in b.fusion.parameters()]

    def encode_images(self, batch: Batch) -> torch.Tensor:
        """`[N, n, d]` LM-width image tokens (precomputed ones pass through)."""
        if batch.image_embeds is not None:
            return batch.image_embeds
        if batch.images is None or batch.images.shape[0] == 0:
            d = self.config.lm.d_model
            return self.embed.weight.new_zeros(0, self.tokens_per_image, d)
        return self.vision(batch.images.to(self.embed.weight.dtype))

    def _rotary(self, positions):
        lm = self.config.lm
        return Rotary.at(positions, head_dim=lm.head_dim, theta=lm.rope_theta)

    # ------------------------------------------------------------ forward
    def forward(self, batch: Batch, *, backend: str = "auto", return_hidden: bool = False):
        """Logits `[B, T, vocab]` of the text tokens (or hidden states)."""
        vc = self.config.vision
        batch.validate(image_size=vc.image_size if batch.images is not None else None, channels=vc.channels,
                       image_tokens=self.tokens_per_image, d_model=self.config.lm.d_model)
        images = self.encode_images(batch)
        text = self.embed(batch.input_ids)
        if self.config.fusion.variant == "insertion":
            h = self._forward_spliced(batch, text, images, backend)
        else:
            h = self._forward_fused(batch, text, images, backend)
        h = self.norm(h)
        return h if return_hidden else self.lm_head(h)

    def _forward_fused(self, batch, h, images, backend):
        layout = batch.layout(images.shape[1])
        has_fusion = any(b.fusion is not None for b in self.blocks)
        image_rotary = self._rotary(layout.image_token_attr(layout.image_pos)) if has_fusion else None
        ctx = Context(layout, self._rotary(layout.text_pos), image_rotary, backend)
        image_tokens = images.reshape(-1, images.shape[-1])
        update = self.config.fusion.variant == "ca_ffn"
        for block in self.blocks:
            h, image_tokens = block(h, image_tokens, ctx, update_images=update)
        return h

    def _forward_spliced(self, batch, text, images, backend):
        B, T, d = text.shape
        splice = batch.splice(images.shape[1])
        S = splice.layout.seq_len
        h = text.new_zeros(B, S, d)
        rows = torch.arange(B, device=text.device)[:, None].expand(B, T)
        h = h.index_put((rows, splice.text_index), text)
        if images.shape[0]:
            h = h.index_put((splice.image_row, splice.image_index), images.reshape(-1, d))
        ctx = Context(splice.layout, self._rotary(splice.layout.text_pos), None, backend)
        for block in self.blocks:
            h, _ = block(h, None, ctx)
        return h[rows, splice.text_index]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
