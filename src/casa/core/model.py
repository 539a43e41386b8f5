"""The vision-language model: a Llama-style decoder whose chosen blocks carry a
fusion layer, plus a vision tower.

Data flow for every variant but `insertion`: image tokens `[N_tok, d]` stay
outside the text stream; each fusion block turns them into keys/values (once
per block and forward) that text queries read through `fusion_attend`.
`ca_ffn` also updates the image tokens with every block's FFN. `insertion`
splices image tokens into the stream and runs plain causal self-attention
per document; positions then count image tokens too.

Design decisions:
- Where the fusion layer sits in its block (the placement of docs/design.md
  §3) is decided in one method, `Block._mix`, used by the full forward and by
  the incremental `step` alike; only the attention functions differ.
- Inference (`inference/session.py`) talks to a block through a small public
  API (`step`, `fusion_image_kv`, `update_image_tokens`) and never reaches
  into its layers, so norms and placements stay this module's business.
- Module names follow Hugging Face Llama (`input_layernorm`,
  `post_attention_layernorm`, `mlp`, and the projections inside `attn`), so
  that checkpoint mapping is a rename of prefixes (`pretrained/hf_lm.py`).
- Positions (RoPE) are explicit tensors: text positions skip image tokens;
  an image's keys take the position of its insertion point (`CasaModel.rotary`).
  A Qwen2.5-VL LM (`LMConfig.mrope_section`) gets 3-component positions from
  `core/positions.py` instead (M-RoPE, as transformers for `insertion`).
- Images may differ in size (dynamic resolution): they travel as flat tokens
  `[N_tok, d]` with a count per image, never padded.
- Frame memory (`FusionConfig.frame_memory = k`, fused variants): each image's
  token grid is average-pooled to k tokens (`memory_tokens`), which are
  spliced into the stream before its insertion point by insertion's own rule
  (`Batch.memory`, the splice of `insertion` with k tokens per image). They
  are the first text of the image's window: they read its images in fusion
  layers, take positions, go through the FFNs and stay in every later
  token's context (the KV cache, in a session), while the full image tokens
  stay keys/values of the fusion layers only. Logits are those of the text
  tokens, as for `insertion`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from casa.config import FusionConfig, LMConfig, ModelConfig
from casa.core.batch import Batch
from casa.core.caches import StepCache
from casa.core.fusion import FusionLayer
from casa.core.layout import Layout
from casa.core.lm import MLP, Attention, RMSNorm, Rotary
from casa.core.positions import fused_image_positions, spliced_positions, text_positions
from casa.vision.dynamic import grid_of
from casa.vision.tower import VisionTower

__all__ = ["Block", "CasaModel", "Context", "init_weights", "memory_tokens"]

Sublayer = Callable[[torch.Tensor], torch.Tensor]  # normalised input -> residual update, same shape


@dataclass
class Context:
    """What every block needs for one forward, computed once."""

    layout: Layout
    rotary: Rotary  # text positions, [B, T]
    image_rotary: Rotary | None  # one position per image token (its insertion point), [N_tok]
    backend: str


class Block(nn.Module):
    """A decoder block: self-attention, an optional fusion layer placed by
    `fusion.placement`, then the SwiGLU FFN; pre-norm residuals throughout.

    Shapes: text states `h: [B, T, d]` (`[1, t, d]` in `step`), flat image
    tokens `[N_tok, d]`; any float dtype, the parameters'.
    """

    def __init__(self, *, lm: LMConfig, fusion: FusionConfig | None):
        super().__init__()
        self.input_layernorm = RMSNorm(dim=lm.d_model, eps=lm.norm_eps)
        self.attn = Attention(d_model=lm.d_model, n_heads=lm.n_heads, n_kv_heads=lm.n_kv_heads,
                              head_dim=lm.head_dim, qkv_bias=lm.qkv_bias)
        self.post_attention_layernorm = RMSNorm(dim=lm.d_model, eps=lm.norm_eps)
        self.mlp = MLP(d_model=lm.d_model, d_ff=lm.d_ff)
        self.placement = fusion.placement if fusion is not None else None
        self.fusion = None
        if fusion is not None:
            self.fusion = FusionLayer(lm=lm, fusion=fusion, own_norm=fusion.placement != "replace")

    # ------------------------------------------------------------ public API
    def fusion_image_kv(self, image_tokens: torch.Tensor, image_rotary: Rotary | None):
        """The fusion layer's keys/values of image tokens (once per image and block).

        Args:
            image_tokens: `[N_tok, d]` LM-width image tokens (flat, all images).
            image_rotary: RoPE at each token's position `[N_tok]` (used by `casa`).
        Returns:
            `(k, v)`, each `[N_tok, Hkv, D]`, the parameters' dtype.
        """
        return self.fusion.image_kv(image_tokens, norm=self._fusion_norm(), sa=self.attn, image_rotary=image_rotary)

    def update_image_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """`ca_ffn`: image tokens `[N_tok, d]` through this block's FFN (residual), same shape."""
        return image_tokens + self.mlp(self.post_attention_layernorm(image_tokens))

    def forward(self, h: torch.Tensor, image_tokens: torch.Tensor | None, ctx: Context, *,
                update_images: bool = False):
        """One block over a whole batch.

        Args:
            h: `[B, T, d]` text states (`[B, S, d]` spliced rows for `insertion`).
            image_tokens: `[N_tok, d]` flat image tokens, or None (`insertion`).
            ctx: the batch's layout, positions and backend.
            update_images: run the image tokens through the FFN too (`ca_ffn`).
        Returns:
            `(h, image_tokens)` with the input shapes.
        """
        kv = self.fusion_image_kv(image_tokens, ctx.image_rotary) if self.fusion is not None else None

        def self_attention(x):
            return self.attn(self.input_layernorm(x), rotary=ctx.rotary, layout=ctx.layout, backend=ctx.backend)

        def fusion(x):
            return self.fusion(x, kv, norm=self._fusion_norm(), sa=self.attn, rotary=ctx.rotary,
                               layout=ctx.layout, backend=ctx.backend)

        h = self._mix(h, self_attention, fusion)
        h = h + self.mlp(self.post_attention_layernorm(h))
        if update_images:
            image_tokens = self.update_image_tokens(image_tokens)
        return h, image_tokens

    def step(self, h: torch.Tensor, *, rotary: Rotary, sa_cache: StepCache, window: StepCache | None) -> torch.Tensor:
        """Incremental `forward` of new tokens of one stream.

        Args:
            h: `[1, t, d]` states of the new tokens.
            rotary: RoPE at their positions, `[1, t]`.
            sa_cache: this block's self-attention `KVCache` (the new tokens join it).
            window: this block's fusion window state (a `KVCache` whose prefix is
                the window's image K/V), or None without a fusion layer.
        Returns:
            `[1, t, d]`.
        """

        def self_attention(x):
            return self.attn.step(x, norm=self.input_layernorm, rotary=rotary, cache=sa_cache)

        def fusion(x):
            return self.fusion.step(x, window, norm=self._fusion_norm(), sa=self.attn, rotary=rotary)

        h = self._mix(h, self_attention, fusion)
        return h + self.mlp(self.post_attention_layernorm(h))

    # -------------------------------------------------------------- helpers
    def _fusion_norm(self) -> nn.Module:
        # `replace` has no SA beside the fusion layer, so it reads the block's own input norm
        return self.input_layernorm if self.placement == "replace" else self.fusion.norm

    def _mix(self, h: torch.Tensor, self_attention: Sublayer, fusion: Sublayer) -> torch.Tensor:
        """The attention part of the block, by placement (docs/design.md §3):
        `parallel` adds both updates to the same input, `before` runs fusion
        first, `replace` runs fusion alone (for `casa` it attends to the
        window's text as well)."""
        if self.fusion is None:
            return h + self_attention(h)
        if self.placement == "parallel":
            return h + self_attention(h) + fusion(h)
        if self.placement == "before":
            h = h + fusion(h)
            return h + self_attention(h)
        return h + fusion(h)


class CasaModel(nn.Module):
    """Vision tower + decoder with fusion blocks; `forward(Batch) -> logits`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.check_frame_memory()  # again: a config's fusion may have been replaced after it was built
        self.config = config
        lm, fusion = config.lm, config.fusion
        self.vision = VisionTower(config.vision, lm_d_model=lm.d_model)
        self.embed = nn.Embedding(lm.vocab_size, lm.d_model)
        fusion_layers = set(fusion.fusion_layers(lm.n_layers))
        self.blocks = nn.ModuleList(
            Block(lm=lm, fusion=fusion if i in fusion_layers else None) for i in range(lm.n_layers)
        )
        self.norm = RMSNorm(dim=lm.d_model, eps=lm.norm_eps)
        self.lm_head = nn.Linear(lm.d_model, lm.vocab_size, bias=False)
        for module in (self.embed, self.blocks, self.lm_head):
            module.apply(init_weights)
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

    @property
    def mrope(self) -> bool:
        """Qwen2.5-VL's multimodal RoPE: positions are `[..., 3]` (core/positions.py)."""
        return self.config.lm.mrope_section is not None

    def image_grids(self, images, counts: torch.Tensor | None) -> torch.Tensor:
        """`[N, 3]` long `(gt, gh, gw)` of each image in LM tokens (the M-RoPE grid).

        Dynamic items and fixed-size Qwen2.5-VL pixels give theirs; other fixed-size
        images (and precomputed tokens) form a square grid of their token count.
        """
        side = self.config.vision.patch_size
        if isinstance(images, (list, tuple)):
            return torch.tensor([grid_of(x, merge_side=side) for x in images], dtype=torch.long).reshape(-1, 3)
        if images is not None and self.config.vision.kind == "hf" and self.config.vision.token_reduction == "none":
            n, _, h, w = images.shape
            return torch.tensor([[1, h // side, w // side]] * n, dtype=torch.long).reshape(-1, 3)
        sides = counts.double().sqrt().round().long()
        if not torch.equal(sides * sides, counts.cpu()):
            raise ValueError(f"image token counts {counts.tolist()} are not square grids; M-RoPE needs each "
                             "image's grid (give the images, not their tokens)")
        return torch.stack([torch.ones_like(sides), sides, sides], dim=-1)

    def encode_batch_images(self, batch: Batch):
        """All images of a batch as flat LM-width tokens.

        Returns:
            `(tokens [N_tok, d], counts [N] long, grids [N, 3] long or None without M-RoPE)`,
            image-major, the parameters' dtype.
        """
        images = self.encode_images(batch)
        if isinstance(images, list):
            d = self.config.lm.d_model
            tokens = torch.cat(images) if images else self.embed.weight.new_zeros(0, d)
            counts = torch.tensor([len(x) for x in images], dtype=torch.long)
        else:
            counts = torch.full((images.shape[0],), images.shape[1], dtype=torch.long)
            tokens = rearrange(images, "img tok d -> (img tok) d")
        grids = None
        if self.mrope:
            grids = batch.image_grids.cpu() if batch.image_grids is not None else self.image_grids(batch.images, counts)
        return tokens, counts, grids

    def encode_images(self, batch: Batch):
        """LM-width image tokens (precomputed ones pass through): `[N, n, d]`, or a list of
        `[n_i, d]` for images of their own sizes (a list of items, dynamic resolution)."""
        if batch.image_embeds is not None:
            return list(batch.image_embeds) if isinstance(batch.image_embeds, tuple) else batch.image_embeds
        if isinstance(batch.images, (list, tuple)):
            dtype = self.embed.weight.dtype
            return self.vision.encode_items([x.to(dtype) for x in batch.images]) if batch.images else []
        if batch.images is None or batch.images.shape[0] == 0:
            d = self.config.lm.d_model
            return self.embed.weight.new_zeros(0, self.tokens_per_image, d)
        return self.vision(batch.images.to(self.embed.weight.dtype))

    def rotary(self, positions: torch.Tensor) -> Rotary:
        """RoPE tables at long `positions` of any shape, `[..., 3]` (t, h, w) for an M-RoPE model
        (cos/sin `[*positions.shape[:-1], D]` then), fp32."""
        lm = self.config.lm
        return Rotary.at(positions, head_dim=lm.head_dim, theta=lm.rope_theta, mrope_section=lm.mrope_section)

    def text_rotary(self, positions: torch.Tensor) -> Rotary:
        """RoPE at 1-D text `positions` (any shape), whatever the model's RoPE."""
        return self.rotary(text_positions(positions) if self.mrope else positions)

    # ------------------------------------------------------------ forward
    def forward(self, batch: Batch, *, backend: str = "auto", return_hidden: bool = False):
        """Logits of the text tokens.

        Args:
            batch: `input_ids [B, T]` long, images `[N, C, S, S]` float (or
                `image_embeds [N, n, d]`), their rows and insertion points.
            backend: attention backend (`core.attention.resolve_backend`).
            return_hidden: return the final-normed hidden states instead.
        Returns:
            `[B, T, vocab]` logits (or `[B, T, d]` hidden states), the parameters' dtype.
        """
        vc = self.config.vision
        fixed = batch.images is not None and not isinstance(batch.images, (list, tuple))
        batch.validate(image_size=vc.image_size if fixed and not vc.dynamic else None, channels=vc.channels,
                       image_tokens=None if vc.dynamic else self.tokens_per_image, d_model=self.config.lm.d_model)
        images, counts, grids = self.encode_batch_images(batch)
        text = self.embed(batch.input_ids)
        if self.config.fusion.variant == "insertion":
            h = self._forward_spliced(batch, text, images, counts, grids, backend)
        else:
            h = self._forward_fused(batch, text, images, counts, grids, backend)
        h = self.norm(h)
        return h if return_hidden else self.lm_head(h)

    def _forward_fused(self, batch, h, image_tokens, counts, grids, backend):
        memory = self.config.fusion.frame_memory
        if memory:  # k pooled tokens per image join the stream (module docstring)
            splice, layout = batch.memory(counts, memory)
            h = _spliced_rows(splice, h, memory_tokens(image_tokens, counts, memory))
        else:
            layout = batch.layout(counts)
        image_rotary = None
        if any(b.fusion is not None for b in self.blocks):
            image_pos = fused_image_positions(layout, grids) if self.mrope else layout.image_token_attr(layout.image_pos)
            image_rotary = self.rotary(image_pos)
        ctx = Context(layout, self.text_rotary(layout.text_pos), image_rotary, backend)
        update = self.config.fusion.variant == "ca_ffn"
        for block in self.blocks:
            h, image_tokens = block(h, image_tokens, ctx, update_images=update)
        return _text_rows(splice, h) if memory else h

    def _forward_spliced(self, batch, text, image_tokens, counts, grids, backend):
        splice = batch.splice(counts)
        h = _spliced_rows(splice, text, image_tokens)
        if self.mrope:
            steps = batch.time_steps if batch.time_steps is not None else torch.ones(len(counts))
            rotary = self.rotary(spliced_positions(splice, grids, steps.cpu()))
        else:
            rotary = self.rotary(splice.layout.text_pos)
        ctx = Context(splice.layout, rotary, None, backend)
        for block in self.blocks:
            h, _ = block(h, None, ctx)
        return _text_rows(splice, h)


def _spliced_rows(splice, text: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Text states `[B, T, d]` and flat spliced tokens `[N_tok, d]` placed in the spliced rows
    `[B, S, d]` (the padding at the end of shorter rows zero)."""
    B, T, d = text.shape
    h = text.new_zeros(B, splice.layout.seq_len, d)
    rows = torch.arange(B, device=text.device)[:, None].expand(B, T)
    h = h.index_put((rows, splice.text_index), text)
    if tokens.shape[0]:
        h = h.index_put((splice.image_row, splice.image_index), tokens)
    return h


def _text_rows(splice, h: torch.Tensor) -> torch.Tensor:
    """The text tokens' states `[B, T, d]` out of spliced rows `[B, S, d]`."""
    B, T = splice.text_index.shape
    rows = torch.arange(B, device=h.device)[:, None].expand(B, T)
    return h[rows, splice.text_index]


def memory_tokens(image_tokens: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """Each image's tokens average-pooled to `k` (a square) tokens: its row-major g x g token grid
    to a sqrt(k) x sqrt(k) one (`adaptive_avg_pool2d`: equal blocks where sqrt(k) divides g).

    Args:
        image_tokens: `[N_tok, d]` flat, image-major LM-width tokens.
        counts: `[N]` long, tokens of each image (each a square number, at least `k`).
        k: memory tokens per image.
    Returns:
        `[N * k, d]`, image-major, row-major within an image, `image_tokens`' dtype.
    """
    side = math.isqrt(k)
    counts = counts.tolist() if torch.is_tensor(counts) else list(counts)
    if not counts:
        return image_tokens[:0]
    grids = {math.isqrt(n) for n in counts}
    if any(math.isqrt(n) ** 2 != n or n < k for n in counts):
        raise ValueError(f"frame memory of {k} tokens: every image needs a square grid of at least {k} tokens, "
                         f"got {sorted(set(counts))}")
    if len(grids) == 1:  # every image the same size: one call
        g = grids.pop()
        x = rearrange(image_tokens, "(img h w) d -> img d h w", h=g, w=g)
        return rearrange(F.adaptive_avg_pool2d(x, side), "img d h w -> (img h w) d")
    return torch.cat([memory_tokens(x, [len(x)], k) for x in image_tokens.split(counts)])


def init_weights(module: nn.Module) -> None:
    """The decoder's init: normal(0, 0.02) for linear and embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


