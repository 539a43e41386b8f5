"""casa's vision-language model for transformers: `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` on a directory written by `casa export --format transformers`.

This file is copied verbatim into the exported directory; it needs torch and
transformers only (no casa). It restates casa's forward (arXiv 2512.19535;
casa's docs/design.md §2-§5) for the exported variants, and casa's tests
hold its greedy tokens to casa's.

Design decisions:
- Module and parameter names are casa's (`embed`, `blocks.N.attn.q_proj`,
  `blocks.N.fusion.attn...`, `vision.encoder...`, `lm_head`), so the weights
  are casa's state dict as it is.
- Images occupy no text position (but in `insertion`): image `i` sits
  before text index `insertion_points[i]`. A window is the text from one
  insertion point to the next; a fusion layer's text query reads its window's
  image keys and, for `casa`, the window's text up to itself, in one softmax;
  `ca` reads the images only (zero update in a window without images). Text
  positions count text tokens only; `casa` rotates an image's keys at its
  insertion point's position. `insertion` splices the image tokens into the
  stream (they take positions and join the self-attention cache).
- The cache: the self-attention cache (transformers' `DynamicCache`) holds
  text only (image tokens too in `insertion`); what a fusion layer needs
  of the current window (its image keys/values, computed once when the image
  arrives, and for `casa` the window's text keys/values) is kept beside it on
  the same cache object (`casa_state`), never in it. A forward call may
  continue a stream: text before its first insertion point continues the
  window the cache left open.
- `generate` works as for any transformers model: the images go in with
  the prompt only (`prepare_inputs_for_generation`), each step feeds the tokens
  the state has not seen. One row per call when images are given, and no
  padding: a stream is a row.
- Attention is eager (SDPA with boolean masks): a reference implementation,
  not a fast one.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_casa import CasaConfig

__all__ = ["CasaForConditionalGeneration", "CasaPreTrainedModel"]


# ----------------------------------------------------------------------------- language model parts
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope(positions, head_dim, theta):
    """(cos, sin) `[..., 1, head_dim]` fp32 at long `positions [...]` (rotate-half convention)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos()[..., None, :], angles.sin()[..., None, :]


def rotate(x, cos_sin):
    """RoPE on `x [..., H, D]` whose leading dims match the positions'."""
    cos, sin = (t.to(x.dtype) for t in cos_sin)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attend(q, k, v, mask):
    """`q [B, t, H, D]` against `k, v [B, S, Hkv, D]` under a bool `mask [t, S]` (True = attend);
    a query that sees no key gets zeros. Returns `[B, t, H, D]`."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    empty = ~mask.any(-1)
    safe = mask | empty[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=safe)
    return out.transpose(1, 2).masked_fill(empty[None, :, None, None], 0.0)


def causal_mask(t, past, device):
    """`[t, past + t]`: new query i sees the `past` keys and the new ones up to itself."""
    return torch.ones(t, past + t, dtype=torch.bool, device=device).tril(past)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, self.n_heads, self.n_kv_heads, self.head_dim = (config.hidden_size, config.num_attention_heads,
                                                           config.num_key_value_heads, config.head_dim)
        bias = config.lm.get("qkv_bias", False)
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def q(self, x):
        return self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim))

    def kv(self, x):
        return (self.k_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim)),
                self.v_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim)))

    def out(self, o):
        return self.o_proj(o.flatten(-2))


class MLP(nn.Module):
    def __init__(self, d, d_ff):
        super().__init__()
        self.gate_proj = nn.Linear(d, d_ff, bias=False)
        self.up_proj = nn.Linear(d, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FusionLayer(nn.Module):
    """How text queries read image tokens (casa's `core.fusion.FusionLayer`, same parameters)."""

    def __init__(self, config):
        super().__init__()
        fusion, d = config.fusion, config.hidden_size
        self.variant = fusion["variant"]
        self.text_keys = self.variant in ("casa", "casa_shared") and fusion.get("text_keys", True)
        self.norm = RMSNorm(d, config.rms_norm_eps) if fusion["placement"] != "replace" else None
        self.attn = None if self.variant in ("ca_shared", "casa_shared") else Attention(config)
        if self.variant == "gated_ca":
            self.attn_gate = nn.Parameter(torch.zeros(1))
            self.ffn_gate = nn.Parameter(torch.zeros(1))
            self.ffn_norm = RMSNorm(d, config.rms_norm_eps)
            self.ffn = MLP(d, config.intermediate_size)

    def gate(self, h, out):
        if self.variant == "gated_ca":
            out = torch.tanh(self.attn_gate) * out
            out = out + torch.tanh(self.ffn_gate) * self.ffn(self.ffn_norm(h + out))
        return out


class Block(nn.Module):
    def __init__(self, config, fused):
        super().__init__()
        d = config.hidden_size
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.mlp = MLP(d, config.intermediate_size)
        self.placement = config.fusion.get("placement", "parallel")
        self.fusion = FusionLayer(config) if fused else None

    def fusion_norm(self):
        return self.input_layernorm if self.placement == "replace" else self.fusion.norm

    def fusion_attn(self):
        return self.fusion.attn if self.fusion.attn is not None else self.attn

    def mix(self, h, self_attention, fusion):
        """The block's attention part by placement: parallel, before, or replace."""
        if self.fusion is None:
            return h + self_attention(h)
        if self.placement == "parallel":
            return h + self_attention(h) + fusion(h)
        if self.placement == "before":
            h = h + fusion(h)
            return h + self_attention(h)
        return h + fusion(h)


# ----------------------------------------------------------------------------- vision tower (casa's built-in ViT)
class ViTAttention(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class ViTMLP(nn.Module):
    def __init__(self, d, d_ff):
        super().__init__()
        self.fc = nn.Linear(d, d_ff)
        self.proj = nn.Linear(d_ff, d)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class ViTBlock(nn.Module):
    def __init__(self, d, n_heads, d_ff):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = ViTAttention(d, n_heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = ViTMLP(d, d_ff)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.patch, d, grid = vc["patch_size"], vc["d_model"], vc["image_size"] // vc["patch_size"]
        self.patch_embed = nn.Linear(self.patch * self.patch * vc["channels"], d)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, d))
        self.blocks = nn.ModuleList(ViTBlock(d, vc["n_heads"], vc["d_ff"]) for _ in range(vc["n_layers"]))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, pixels):
        """`[N, C, S, S]` -> `[N, grid * grid, d]`, patches row-major, each `(p1 p2 c)`."""
        n, c, s, _ = pixels.shape
        p, g = self.patch, s // self.patch
        x = pixels.reshape(n, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(n, g * g, p * p * c)
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


class Projector(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class VisionTower(nn.Module):
    """ViT, token reduction (`none`, `unshuffle`, `pool` over r x r patches), projector."""

    def __init__(self, vc, lm_width):
        super().__init__()
        self.reduction, self.r = vc.get("token_reduction", "none"), vc.get("reduction_factor", 2)
        self.encoder = ViT(vc)
        width = vc["d_model"] * (self.r * self.r if self.reduction == "unshuffle" else 1)
        self.projector = nn.Identity() if vc.get("projector") == "identity" else Projector(width, lm_width)

    def forward(self, pixels):
        x = self.encoder(pixels)
        if self.reduction != "none":
            n, tokens, d = x.shape
            h = math.isqrt(tokens) // self.r
            x = x.reshape(n, h, self.r, h, self.r, d)
            x = x.mean(dim=(2, 4)) if self.reduction == "pool" else x.permute(0, 1, 3, 2, 4, 5)
            x = x.reshape(n, h * h, -1)
        return self.projector(x)


# ----------------------------------------------------------------------------- the model
class CasaPreTrainedModel(PreTrainedModel):
    config_class = CasaConfig
    base_model_prefix = "casa"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class _State:
    """What a stream's fusion layers keep of its current window, and where the stream is."""

    def __init__(self):
        self.position = 0  # RoPE position of the next text token (fused variants)
        self.text = 0  # text tokens fed
        self.images = {}  # layer -> (k, v) `[B, N, Hkv, D]` of the window's images (absent: none)
        self.window = {}  # layer -> (k, v) `[B, L, Hkv, D]` of the window's text so far (casa)


class CasaForConditionalGeneration(CasaPreTrainedModel, GenerationMixin):
    """casa's model (see the module docstring): `forward(input_ids, pixel_values, insertion_points)`."""

    def __init__(self, config: CasaConfig):
        super().__init__(config)
        fusion, n = config.fusion, config.num_hidden_layers
        self.variant = fusion.get("variant", "casa")
        if self.variant == "insertion":
            fused = set()
        else:
            fused = set(fusion["layers"]) if fusion.get("layers") is not None else set(range(0, n, fusion["every"]))
        self.vision = VisionTower(config.vision, config.hidden_size)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i in fused) for i in range(n))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids=None, pixel_values=None, insertion_points=None, attention_mask=None, cache=None,
                past_key_values=None, use_cache=None, return_dict=True, **kwargs):
        """Logits `[B, t, vocab]` of `input_ids [B, t]`, the images `pixel_values [N, C, S, S]` sitting
        before text indices `insertion_points [N]` (one row); continues the stream of `cache`."""
        cache = cache if cache is not None else past_key_values
        if cache is None:
            cache = DynamicCache()
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("casa: padding is not supported (one stream per row); give rows of equal length")
        B, t = input_ids.shape
        state = getattr(cache, "casa_state", None)
        if state is None:
            state = cache.casa_state = _State()
        groups = self._groups(pixel_values, insertion_points, B, t)
        h = self.embed(input_ids)
        if self.variant == "insertion":
            h = self._spliced(h, groups, cache)
        else:
            h = self._fused(h, groups, cache, state)
        state.text += t
        logits = self.lm_head(self.norm(h))
        out = CausalLMOutputWithPast(logits=logits)
        out["cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"] = \
            cache if use_cache is not False else None
        return out if return_dict else out.to_tuple()

    def _groups(self, pixel_values, insertion_points, B, t):
        """[(point, image tokens [n, d])]: the images at each distinct insertion point, in order."""
        if pixel_values is None or len(pixel_values) == 0:
            return []
        if B != 1:
            raise ValueError(f"casa: images need one row per call (got {B}); a stream is a row")
        if insertion_points is None or len(insertion_points) != len(pixel_values):
            raise ValueError("casa: give one insertion point per image (the text index before which it sits)")
        points = [int(p) for p in insertion_points]
        if points != sorted(points) or not 0 <= points[0] <= points[-1] < t:
            raise ValueError(f"casa: insertion_points {points} must be sorted, within [0, {t - 1}]")
        tokens = self.vision(pixel_values.to(self.embed.weight.dtype))
        out = []
        for i, p in enumerate(points):
            if out and out[-1][0] == p:
                out[-1] = (p, torch.cat([out[-1][1], tokens[i]]))
            else:
                out.append((p, tokens[i]))
        return out

    def _fused(self, h, groups, cache, state):
        """Every variant but insertion: text through the blocks, images as fusion keys only."""
        B, t, _ = h.shape
        cfg = self.config
        text_rope = rope(torch.arange(state.position, state.position + t, device=h.device), cfg.head_dim,
                         cfg.rope_theta)
        bounds = [0] + [p for p, _ in groups] + [t]  # segment k: [bounds[k], bounds[k+1]); k >= 1 opens a window
        images = [g for _, g in groups]
        for layer, block in enumerate(self.blocks):
            past = cache.get_seq_length(layer)

            def self_attention(x, block=block, layer=layer, past=past):
                x = block.input_layernorm(x)
                k, v = block.attn.kv(x)
                q, k = rotate(block.attn.q(x), text_rope), rotate(k, text_rope)
                keys, values = cache.update(k.transpose(1, 2), v.transpose(1, 2), layer)
                out = attend(q, keys.transpose(1, 2), values.transpose(1, 2), causal_mask(t, past, h.device))
                return block.attn.out(out)

            def fusion(x, block=block, layer=layer):
                return self._fusion(block, layer, x, images, bounds, text_rope, state)

            h = block.mix(h, self_attention, fusion)
            h = h + block.mlp(block.post_attention_layernorm(h))
            if self.variant == "ca_ffn":
                images = [g + block.mlp(block.post_attention_layernorm(g)) for g in images]
        state.position += t
        return h

    def _fusion(self, block, layer, h, images, bounds, text_rope, state):
        """A fusion layer's update of `h [B, t, d]`, window by window; keeps the last window's state."""
        attn, norm, fusion = block.fusion_attn(), block.fusion_norm(), block.fusion
        x = norm(h)
        q = attn.q(x)
        k_txt = v_txt = None
        if fusion.text_keys:
            k_txt, v_txt = attn.kv(x)
            q, k_txt = rotate(q, text_rope), rotate(k_txt, text_rope)
        outs = []
        for seg in range(len(bounds) - 1):
            lo, hi = bounds[seg], bounds[seg + 1]
            if seg > 0:  # a new window: its images' keys, computed once (casa: at the insertion point's position)
                k, v = attn.kv(norm(images[seg - 1])[None])
                if fusion.text_keys:
                    at = torch.full((k.shape[1],), state.position + lo, device=h.device)
                    k = rotate(k, rope(at, self.config.head_dim, self.config.rope_theta))
                state.images[layer] = (k, v)
                state.window.pop(layer, None)
            none = h.new_zeros(h.shape[0], 0, attn.n_kv_heads, attn.head_dim)
            keys, values = state.images.get(layer, (none, none))
            n_img, past = keys.shape[1], 0
            if fusion.text_keys:  # the window's text so far, then this segment's
                prev_k, prev_v = state.window.get(layer, (none, none))
                state.window[layer] = (torch.cat([prev_k, k_txt[:, lo:hi]], dim=1),
                                       torch.cat([prev_v, v_txt[:, lo:hi]], dim=1))
                past = prev_k.shape[1]
                win_k, win_v = state.window[layer]
                keys, values = torch.cat([keys, win_k], dim=1), torch.cat([values, win_v], dim=1)
            if hi == lo:
                continue
            if keys.shape[1] == 0:  # ca in a window without images: no key, a zero update
                outs.append(h.new_zeros(h.shape[0], hi - lo, h.shape[-1]))
                continue
            mask = torch.ones(hi - lo, keys.shape[1], dtype=torch.bool, device=h.device)
            if fusion.text_keys:
                mask[:, n_img:] = causal_mask(hi - lo, past, h.device)
            outs.append(attn.out(attend(q[:, lo:hi], keys, values, mask)))
        return fusion.gate(h, torch.cat(outs, dim=1))

    def _spliced(self, text, groups, cache):
        """insertion: the image tokens spliced into the stream before their insertion points."""
        B, t, _ = text.shape
        parts, index, at, cursor = [], [], 0, 0  # index: where each text token lands in the spliced chunk
        for p, g in groups:
            parts += [text[:, cursor:p], g[None].expand(B, -1, -1)]
            index += list(range(at, at + p - cursor))
            at += p - cursor + g.shape[0]
            cursor = p
        parts.append(text[:, cursor:])
        index += list(range(at, at + t - cursor))
        h = torch.cat(parts, dim=1)
        S = h.shape[1]
        cfg = self.config
        past = cache.get_seq_length(0)
        cos_sin = rope(torch.arange(past, past + S, device=h.device), cfg.head_dim, cfg.rope_theta)
        mask = causal_mask(S, past, h.device)
        for layer, block in enumerate(self.blocks):
            x = block.input_layernorm(h)
            q, (k, v) = rotate(block.attn.q(x), cos_sin), block.attn.kv(x)
            keys, values = cache.update(rotate(k, cos_sin).transpose(1, 2), v.transpose(1, 2), layer)
            h = h + block.attn.out(attend(q, keys.transpose(1, 2), values.transpose(1, 2), mask))
            h = h + block.mlp(block.post_attention_layernorm(h))
        return h[:, index]

    # ------------------------------------------------------------------ generation
    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, pixel_values=None,
                                      insertion_points=None, **kwargs):
        """The tokens the stream has not seen; the images with the prompt only."""
        given = cache if cache is not None else past_key_values
        state = getattr(given, "casa_state", None)
        fed = state.text if state is not None else 0
        inputs = {"input_ids": input_ids[:, fed:], "use_cache": True}
        if fed == 0:
            inputs.update(pixel_values=pixel_values, insertion_points=insertion_points)
        if given is not None:
            inputs["cache" if cache is not None else "past_key_values"] = given
        return inputs
