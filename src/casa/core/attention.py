"""The one place where the attention backend is chosen.

Two entry points, both taking token-major tensors (`q: [B, T, H, D]`, text
`k, v: [B, T, Hkv, D]`, flat image `k, v: [N_img_tokens, Hkv, D]`) and
returning `[B, T, H, D]`:

- `fusion_attend`: text queries against the image tokens of their window
  and, with `text_keys`, the window's text up to themselves (docs/design.md §4);
- `causal_attend`: text self-attention, causal within each packed document.

Backends:
- `reference`: one dense boolean mask + SDPA. Slow, obviously right: the
  ground truth of the tests.
- `windowed`: windows folded into the batch (padded) + SDPA, with backward.
  The default on CPU, for training and inference.
- `flex`: FlexAttention with a BlockMask built from window ids, compiled once
  and cached per layout. Forward-only on CPU; training on GPU.
- `flash`: `flash_attn_varlen_func` (bottom-right causal), CUDA + flash-attn.

Queries that see no key at all (`ca` text in a window without an image) get
a zero update; no backend produces NaN for them.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention.bias import causal_lower_right

from casa.core.layout import Layout

BACKENDS = ("reference", "windowed", "flex", "flash")


def flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` -> flash on CUDA with flash-attn, flex on other CUDA, windowed on CPU."""
    if backend == "auto":
        if device.type == "cuda":
            return "flash" if flash_available() else "flex"
        return "windowed"
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected 'auto' or one of {BACKENDS}")
    if backend == "flash" and not flash_available():
        raise RuntimeError("attention backend 'flash' needs CUDA and the flash-attn package")
    return backend


def _sdpa(q, k, v, mask):
    """SDPA on token-major tensors with grouped-query heads."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
    )
    return out.transpose(1, 2)


def _guard_empty_rows(mask: torch.Tensor):
    """Let fully masked query rows see key 0 (their output is zeroed later) so
    that neither forward nor backward produces NaN. Returns (mask, has_key)."""
    has_key = mask.any(-1, keepdim=True)  # [., 1, L, 1]
    if bool(has_key.all()):
        return mask, None
    first = torch.zeros_like(mask)
    first[..., 0] = True
    return mask | (first & ~has_key), has_key


# ---------------------------------------------------------------- fusion
def fusion_attend(q, k_txt, v_txt, k_img, v_img, layout: Layout, *, text_keys: bool, backend: str):
    backend = resolve_backend(backend, q.device)
    if backend == "reference":
        return _fusion_reference(q, k_txt, v_txt, k_img, v_img, layout, text_keys)
    if backend == "windowed":
        return _fusion_windowed(q, k_txt, v_txt, k_img, v_img, layout, text_keys)
    if backend == "flex":
        return _fusion_flex(q, k_txt, v_txt, k_img, v_img, layout, text_keys)
    return _fusion_flash(q, k_txt, v_txt, k_img, v_img, layout, text_keys)


def _row_keys(k_txt, v_txt, k_img, v_img, layout: Layout, text_keys: bool):
    """Keys per row: `[images of the row (padded) ; text]` (see `Layout.dense_keys`)."""
    image_index = layout.dense_keys()[0]
    k = k_img[image_index]
    v = v_img[image_index]
    if text_keys:
        k, v = torch.cat([k, k_txt], dim=1), torch.cat([v, v_txt], dim=1)
    return k, v


def _fusion_reference(q, k_txt, v_txt, k_img, v_img, layout, text_keys):
    k, v = _row_keys(k_txt, v_txt, k_img, v_img, layout, text_keys)
    if k.shape[1] == 0:
        return torch.zeros_like(q)
    mask, has_key = _guard_empty_rows(layout.dense_mask(text_keys))
    out = _sdpa(q, k, v, mask)
    if has_key is not None:
        out = torch.where(has_key[:, 0, :, :, None], out, 0.0)
    return out


def _fusion_windowed(q, k_txt, v_txt, k_img, v_img, layout, text_keys):
    fw = layout.folded()
    if fw.image_index.shape[1] == 0 and not text_keys:
        return torch.zeros_like(q)
    B, T, H, D = q.shape
    W, L = fw.text_index.shape
    if fw.uniform:
        # Windows tile the text (and the image tokens) exactly, in order: folding
        # is a view, and the mask is bottom-right causal (all images, causal text).
        fold = lambda x, n: x.reshape(W, n, *x.shape[-2:])  # noqa: E731
        q_w, k, v = fold(q, L), fold(k_img, k_img.shape[0] // W), fold(v_img, v_img.shape[0] // W)
        if text_keys:
            k, v = torch.cat([k, fold(k_txt, L)], dim=1), torch.cat([v, fold(v_txt, L)], dim=1)
        mask = causal_lower_right(L, k.shape[1]) if text_keys else None
        return _sdpa(q_w, k, v, mask).reshape(B, T, H, D)
    k, v = k_img[fw.image_index], v_img[fw.image_index]  # [W, N, Hkv, D]
    if text_keys:
        k = torch.cat([k, k_txt.reshape(B * T, *k_txt.shape[2:])[fw.text_index]], dim=1)
        v = torch.cat([v, v_txt.reshape(B * T, *v_txt.shape[2:])[fw.text_index]], dim=1)
    mask, has_key = _guard_empty_rows(fw.mask(text_keys))
    out = _sdpa(q.reshape(B * T, H, D)[fw.text_index], k, v, mask)  # [W, L, H, D]
    if has_key is not None:
        out = torch.where(has_key[:, 0, :, :, None], out, 0.0)
    flat = out.new_zeros(B * T, H, D).index_put((fw.text_index[fw.text_valid],), out[fw.text_valid])
    return flat.view(B, T, H, D)


# FlexAttention works in blocks of 128 queries x 128 keys. Both sequence
# lengths are padded to a multiple of it: new layouts then rarely mean a
# recompile, and CPU-compiled kernels for a length below one block are not
# trusted (torch 2.13 gives wrong rows for 24 queries of head_dim 8).
FLEX_BLOCK = 128


def _pad_seq(x: torch.Tensor, value: int = 0) -> torch.Tensor:
    """Pad dim 1 (the sequence: [B, T] ids or [B, T, H, D] features) to a multiple of FLEX_BLOCK."""
    pad = -x.shape[1] % FLEX_BLOCK
    if not pad:
        return x
    return F.pad(x, (0, pad), value=value) if x.dim() == 2 else F.pad(x, (0, 0, 0, 0, 0, pad))


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _block_mask(layout: Layout, key: str, mask_mod, q_len: int, kv_len: int):
    from torch.nn.attention.flex_attention import create_block_mask

    return layout._cached(
        ("block_mask", key),
        lambda: create_block_mask(mask_mod, layout.batch_size, None, q_len, kv_len, device=layout.device),
    )


def _fusion_flex(q, k_txt, v_txt, k_img, v_img, layout, text_keys):
    k, v = _row_keys(k_txt, v_txt, k_img, v_img, layout, text_keys)
    if k.shape[1] == 0:
        return torch.zeros_like(q)
    _, _, key_window, key_order = layout.dense_keys()
    key_window, key_order = key_window[:, : k.shape[1]], key_order[:, : k.shape[1]]
    pad = -k.shape[1] % FLEX_BLOCK
    if pad:  # padded keys belong to window -1, which no query has
        k, v = F.pad(k, (0, 0, 0, 0, 0, pad)), F.pad(v, (0, 0, 0, 0, 0, pad))
        key_window, key_order = F.pad(key_window, (0, pad), value=-1), F.pad(key_order, (0, pad))
    q_window = _pad_seq(layout.text_window, -2)  # padded queries: window -2, no key, output dropped

    def mask_mod(b, h, qi, ki):
        return (key_window[b, ki] == q_window[b, qi]) & (key_order[b, ki] <= qi)

    T = q.shape[1]
    bm = _block_mask(layout, f"fusion-{text_keys}", mask_mod, q_window.shape[1], k.shape[1])
    out = _compiled_flex()(rearrange(_pad_seq(q), "b t h d -> b h t d"), rearrange(k, "b s h d -> b h s d"),
                           rearrange(v, "b s h d -> b h s d"), block_mask=bm, enable_gqa=True)
    return rearrange(out[:, :, :T], "b h t d -> b t h d")


def _fusion_flash(q, k_txt, v_txt, k_img, v_img, layout, text_keys):
    from flash_attn import flash_attn_varlen_func

    B, T, H, D = q.shape
    q_index, key_index, cu_q, cu_k, max_q, max_k = layout.varlen(text_keys)
    if len(q_index) == 0:
        return torch.zeros_like(q)
    k_all, v_all = k_img, v_img
    if text_keys:
        k_all = torch.cat([k_img, k_txt.reshape(B * T, *k_txt.shape[2:])])
        v_all = torch.cat([v_img, v_txt.reshape(B * T, *v_txt.shape[2:])])
    # causal=True is bottom-right aligned: query j of a window sees keys 0 .. N_w + j
    out = flash_attn_varlen_func(q.reshape(B * T, H, D)[q_index], k_all[key_index], v_all[key_index],
                                 cu_q, cu_k, max_q, max_k, causal=text_keys)
    if len(q_index) == B * T:  # every window kept: queries are the flat text, in order
        return out.view(B, T, H, D)
    return q.new_zeros(B * T, H, D).index_put((q_index,), out).view(B, T, H, D)


# ------------------------------------------------------- self-attention
def causal_attend(q, k, v, layout: Layout, *, backend: str):
    backend = resolve_backend(backend, q.device)
    if backend == "flex":
        return _causal_flex(q, k, v, layout)
    if backend == "flash":
        return _causal_flash(q, k, v, layout)
    if backend == "windowed" and not layout.single_doc_rows:
        return _causal_folded(q, k, v, layout)
    mask = layout.causal_mask()
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=mask is None, enable_gqa=True,
    )
    return out.transpose(1, 2)


def _causal_folded(q, k, v, layout):
    """Packed documents folded into the batch, padded at their end, so that
    plain `is_causal` is right for every real query (padded keys come after
    it) and no work is spent across documents."""
    B, T, H, D = q.shape
    index, valid = layout.folded_documents()
    flat = lambda x: x.reshape(B * T, *x.shape[2:])  # noqa: E731
    out = F.scaled_dot_product_attention(
        flat(q)[index].transpose(1, 2), flat(k)[index].transpose(1, 2), flat(v)[index].transpose(1, 2),
        is_causal=True, enable_gqa=True,
    ).transpose(1, 2)
    if bool(valid.all()):  # equal documents tile the text in order
        return out.reshape(B, T, H, D)
    return q.new_zeros(B * T, H, D).index_put((index[valid],), out[valid]).view(B, T, H, D)


def _causal_flex(q, k, v, layout):
    doc = _pad_seq(layout.text_doc, -1)  # padded positions: document -1, outputs dropped

    def mask_mod(b, h, qi, ki):
        return (doc[b, qi] == doc[b, ki]) & (ki <= qi)

    T = q.shape[1]
    bm = _block_mask(layout, "causal", mask_mod, doc.shape[1], doc.shape[1])
    q, k, v = (rearrange(_pad_seq(x), "b t h d -> b h t d") for x in (q, k, v))
    out = _compiled_flex()(q, k, v, block_mask=bm, enable_gqa=True)
    return rearrange(out[:, :, :T], "b h t d -> b t h d")


def _causal_flash(q, k, v, layout):
    """One varlen sequence per document (documents are contiguous in the flat text)."""
    from flash_attn import flash_attn_varlen_func

    B, T, H, D = q.shape
    lengths = torch.bincount(layout.text_doc.flatten())
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).int()
    m = int(lengths.max())
    flat = lambda x: x.reshape(B * T, *x.shape[2:])  # noqa: E731
    return flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, m, m, causal=True).view(B, T, H, D)


# ------------------------------------------------------- incremental
def cached_attend(q, k, v, *, mask: torch.Tensor | None, backend: str):
    """New queries `q: [1, t, H, D]` against cached, head-major keys/values
    `k, v: [1, Hkv, S, D]` (cache.py); returns `[1, t, H, D]`. `mask` is a
    boolean `[t, S]` built by the cache (True = attend), or None when every key
    is visible (a single decoded token).

    SDPA on every backend: with one query or a short chunk there is no window
    structure left for flex or flash to exploit. Without a mask (decode), the
    query heads that share a key/value head are folded into the query length
    (`[1, Hkv, group, D]`), so that grouped-query attention reads the cache
    once, in place; SDPA's `enable_gqa` path is ~2x slower there on CPU. With
    a mask (a chunk), `enable_gqa` and the `[t, S]` mask broadcast over heads
    are the faster of the two.
    """
    resolve_backend(backend, q.device)  # same validation as the other entry points
    if mask is not None:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[None, None], enable_gqa=True)
        return out.transpose(1, 2)
    B, t, H, D = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    qg = q.reshape(B, t, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, g * t, D)
    out = F.scaled_dot_product_attention(qg, k, v)
    return out.reshape(B, Hkv, g, t, D).permute(0, 3, 1, 2, 4).reshape(B, t, H, D)
