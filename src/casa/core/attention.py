"""The one place where the attention backend is chosen.

Shape letters (used in every docstring of core/ and inference/):

    B    batch rows                      T    text tokens per row
    H    query heads                     Hkv  key/value heads (H % Hkv == 0: grouped-query)
    D    head dim                        d    model width (H * D for the LM)
    n    tokens per image                N_tok image tokens of the batch, flat (N_img * n)
    K    image-key slots per row         W    windows (or packed documents) folded into the batch
    L    text tokens of the longest window (padded)
    N    image tokens of the window with the most (padded)
    t    new tokens fed to a stream      S    keys held in a stream's cache (prefix included)

Entry points take token-major tensors (`q: [B, T, H, D]`, text
`k, v: [B, T, Hkv, D]`, flat image `k, v: [N_tok, Hkv, D]`) and return
`[B, T, H, D]` in the dtype of `q`:

- `fusion_attend`: text queries against the image tokens of their window
  and, with `text_keys`, the window's text up to themselves (docs/design.md §4);
- `causal_attend`: text self-attention, causal within each packed document;
- `cached_attend`: new tokens of one stream against cached keys (§5).

Backends:
- `reference`: one dense boolean mask + SDPA. Slow, obviously right: the
  ground truth of the tests.
- `windowed`: windows folded into the batch (padded) + SDPA, with backward.
  The default on CPU, for training and inference.
- `flex`: FlexAttention with a BlockMask built from window ids, compiled once
  and cached per layout. Forward-only on CPU; training on GPU.
- `flash`: `flash_attn_varlen_func` (bottom-right causal), CUDA + flash-attn.

Design decisions:
- Every backend reads the mask rule from `core/layout.py` (dense mask,
  folded windows, window ids, varlen offsets); none restates it.
- Queries that see no key at all (`ca` text in a window without an image) get
  a zero update; no backend produces NaN for them, forward or backward.
- Incremental attention is SDPA whatever the backend (so it takes none: a
  stream validates its backend once, when it starts): one query or a short
  chunk has no window structure left for flex or flash to exploit. On the
  kernel decode path (`core.decode.resolve_decode`), up to
  `KERNEL_MAX_TOKENS` new tokens take casa's kernel instead: it reads the
  cache once for all the queries sharing a key/value head, where SDPA reads
  it at a fraction of the bandwidth.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention.bias import causal_lower_right

from casa.core import cpu_kernels
from casa.core.decode import kernels_on
from casa.core.layout import Layout

__all__ = ["BACKENDS", "FLEX_BLOCK", "KERNEL_MAX_TOKENS", "cached_attend", "causal_attend", "flash_available",
           "fusion_attend", "resolve_backend"]

BACKENDS = ("reference", "windowed", "flex", "flash")
KERNEL_MAX_TOKENS = 8  # new tokens up to which `cached_attend` takes the CPU kernel (longer chunks: SDPA's GEMMs)


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
        raise ValueError("attention backend 'flash' needs CUDA and the flash-attn package (pip install flash-attn)")
    return backend


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """Token-major `[B, T, H, D]` -> SDPA's head-major `[B, H, T, D]`."""
    return rearrange(x, "b t h d -> b h t d")


def _tokens_first(x: torch.Tensor) -> torch.Tensor:
    """SDPA's head-major `[B, H, T, D]` -> token-major `[B, T, H, D]`."""
    return rearrange(x, "b h t d -> b t h d")


def _flat(x: torch.Tensor) -> torch.Tensor:
    """Rows of text `[B, T, H, D]` -> flat text `[B * T, H, D]` (flat index `b * T + t`)."""
    return rearrange(x, "b t h d -> (b t) h d")


def _sdpa(q, k, v, mask, *, is_causal: bool = False):
    """SDPA on token-major tensors with grouped-query heads.

    Args:
        q: `[B', Tq, H, D]`; k, v: `[B', Tk, Hkv, D]`.
        mask: bool, broadcastable to `[B', H, Tq, Tk]` (True = attend), or None.
    Returns:
        `[B', Tq, H, D]`.
    """
    out = F.scaled_dot_product_attention(_heads_first(q), _heads_first(k), _heads_first(v), attn_mask=mask,
                                         is_causal=is_causal, enable_gqa=True)
    return _tokens_first(out)


def _guard_empty_rows(mask: torch.Tensor):
    """Make fully masked query rows finite.

    Why: a query row whose keys are all masked is a softmax over only -inf,
    which SDPA turns into NaN; zeroing that output afterwards does not help,
    since the NaN reaches the gradients of every key (0 * NaN = NaN). So such
    rows are allowed key 0 (any key would do), and the caller replaces their
    output by zero, the defined update for a query with nothing to read.

    Args:
        mask: bool `[..., Tq, Tk]`.
    Returns:
        `(mask, has_key)`: the guarded mask, and bool `[..., Tq, 1]` telling the
        rows that had a key (None when all had one: nothing to zero).
    """
    has_key = mask.any(-1, keepdim=True)
    if bool(has_key.all()):
        return mask, None
    first = torch.zeros_like(mask)
    first[..., 0] = True
    return mask | (first & ~has_key), has_key


# ---------------------------------------------------------------- fusion
def fusion_attend(q, k_txt, v_txt, k_img, v_img, layout: Layout, *, text_keys: bool, backend: str):
    """Text queries against their window's image tokens (and, with `text_keys`,
    the window's text up to themselves), in one softmax (docs/design.md §4).

    Args:
        q: `[B, T, H, D]` text queries (after RoPE for `casa`).
        k_txt, v_txt: `[B, T, Hkv, D]` text keys/values, or None without `text_keys`.
        k_img, v_img: `[N_tok, Hkv, D]` flat image keys/values, images in `layout` order.
        layout: the batch's windows (`core.layout.Layout`).
        text_keys: whether the window's text is among the keys (`casa`).
        backend: `auto` or one of `BACKENDS`.
    Returns:
        `[B, T, H, D]`, dtype of `q`; zero for a query whose window has no key.
    """
    backend = resolve_backend(backend, q.device)
    if backend == "reference":
        return _fusion_reference(q, k_txt, v_txt, k_img, v_img, layout, text_keys)
    if backend == "windowed":
        return _fusion_windowed(q, k_txt, v_txt, k_img, v_img, layout, text_keys)
    if backend == "flex":
        return _fusion_flex(q, k_txt, v_txt, k_img, v_img, layout, text_keys)
    return _fusion_flash(q, k_txt, v_txt, k_img, v_img, layout, text_keys)


def _row_keys(k_txt, v_txt, k_img, v_img, layout: Layout, text_keys: bool):
    """Keys per row: `[images of the row (padded) ; text]` (see `Layout.dense_keys`),
    each `[B, K (+T), Hkv, D]`."""
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
    if has_key is not None:  # [B, 1, T, 1] -> [B, T, 1, 1]: zero the rows that had no key
        out = torch.where(rearrange(has_key, "b one t k -> b t one k"), out, 0.0)
    return out


def _fusion_windowed(q, k_txt, v_txt, k_img, v_img, layout, text_keys):
    fw = layout.folded()
    if fw.image_index.shape[1] == 0 and not text_keys:
        return torch.zeros_like(q)
    B, T, H, D = q.shape
    W, L = fw.text_index.shape
    if fw.uniform:
        # Windows tile the flat text (and the image tokens) exactly, in order: folding
        # is a view, and the mask is bottom-right causal (all images, causal text).
        def fold(x):
            return rearrange(x, "(w l) h d -> w l h d", w=W)

        q_w, k, v = fold(_flat(q)), fold(k_img), fold(v_img)
        if text_keys:
            k, v = torch.cat([k, fold(_flat(k_txt))], dim=1), torch.cat([v, fold(_flat(v_txt))], dim=1)
        mask = causal_lower_right(L, k.shape[1]) if text_keys else None
        return rearrange(_sdpa(q_w, k, v, mask), "(b w) l h d -> b (w l) h d", b=B)
    k, v = k_img[fw.image_index], v_img[fw.image_index]  # [W, N, Hkv, D]
    if text_keys:
        k = torch.cat([k, _flat(k_txt)[fw.text_index]], dim=1)  # [W, N + L, Hkv, D]
        v = torch.cat([v, _flat(v_txt)[fw.text_index]], dim=1)
    mask, has_key = _guard_empty_rows(fw.mask(text_keys))  # [W, 1, L, N (+L)]
    out = _sdpa(_flat(q)[fw.text_index], k, v, mask)  # [W, L, H, D]
    if has_key is not None:
        out = torch.where(rearrange(has_key, "w one l k -> w l one k"), out, 0.0)
    flat = out.new_zeros(B * T, H, D).index_put((fw.text_index[fw.text_valid],), out[fw.text_valid])
    return rearrange(flat, "(b t) h d -> b t h d", b=B)


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

    return layout.cached(
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
    out = _compiled_flex()(_heads_first(_pad_seq(q)), _heads_first(k), _heads_first(v), block_mask=bm,
                           enable_gqa=True)
    return _tokens_first(out[:, :, :T])


def _fusion_flash(q, k_txt, v_txt, k_img, v_img, layout, text_keys):
    from flash_attn import flash_attn_varlen_func

    B, T, H, D = q.shape
    q_index, key_index, cu_q, cu_k, max_q, max_k = layout.varlen(text_keys)
    if len(q_index) == 0:
        return torch.zeros_like(q)
    k_all, v_all = k_img, v_img  # key_index indexes [image tokens ; flat text]
    if text_keys:
        k_all, v_all = torch.cat([k_img, _flat(k_txt)]), torch.cat([v_img, _flat(v_txt)])
    # causal=True is bottom-right aligned: query j of a window sees keys 0 .. N_w + j
    out = flash_attn_varlen_func(_flat(q)[q_index], k_all[key_index], v_all[key_index],
                                 cu_q, cu_k, max_q, max_k, causal=text_keys)
    if len(q_index) != B * T:  # windows left out (no key): their queries get zero
        out = q.new_zeros(B * T, H, D).index_put((q_index,), out)
    return rearrange(out, "(b t) h d -> b t h d", b=B)


# ------------------------------------------------------- self-attention
def causal_attend(q, k, v, layout: Layout, *, backend: str):
    """Text self-attention, causal within each packed document.

    Args:
        q: `[B, T, H, D]`; k, v: `[B, T, Hkv, D]` (after RoPE).
        layout: the batch's documents.
        backend: `auto` or one of `BACKENDS`.
    Returns:
        `[B, T, H, D]`, dtype of `q`.
    """
    backend = resolve_backend(backend, q.device)
    if backend == "flex":
        return _causal_flex(q, k, v, layout)
    if backend == "flash":
        return _causal_flash(q, k, v, layout)
    if backend == "windowed" and not layout.single_doc_rows:
        return _causal_folded(q, k, v, layout)
    mask = layout.causal_mask()  # None: one document per row, plain `is_causal`
    return _sdpa(q, k, v, mask, is_causal=mask is None)


def _causal_folded(q, k, v, layout):
    """Packed documents folded into the batch, padded at their end, so that
    plain `is_causal` is right for every real query (padded keys come after
    it) and no work is spent across documents."""
    B, T, H, D = q.shape
    index, valid = layout.folded_documents()  # [W, L]
    out = _sdpa(_flat(q)[index], _flat(k)[index], _flat(v)[index], None, is_causal=True)  # [W, L, H, D]
    if bool(valid.all()):  # equal documents tile the text in order
        return rearrange(out, "(b w) l h d -> b (w l) h d", b=B)
    flat = q.new_zeros(B * T, H, D).index_put((index[valid],), out[valid])
    return rearrange(flat, "(b t) h d -> b t h d", b=B)


def _causal_flex(q, k, v, layout):
    doc = _pad_seq(layout.text_doc, -1)  # padded positions: document -1, outputs dropped

    def mask_mod(b, h, qi, ki):
        return (doc[b, qi] == doc[b, ki]) & (ki <= qi)

    T = q.shape[1]
    bm = _block_mask(layout, "causal", mask_mod, doc.shape[1], doc.shape[1])
    q, k, v = (_heads_first(_pad_seq(x)) for x in (q, k, v))
    out = _compiled_flex()(q, k, v, block_mask=bm, enable_gqa=True)
    return _tokens_first(out[:, :, :T])


def _causal_flash(q, k, v, layout):
    """One varlen sequence per document (documents are contiguous in the flat text)."""
    from flash_attn import flash_attn_varlen_func

    B, T, H, D = q.shape
    lengths = torch.bincount(layout.text_doc.flatten())
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).int()
    m = int(lengths.max())
    out = flash_attn_varlen_func(_flat(q), _flat(k), _flat(v), cu, cu, m, m, causal=True)
    return rearrange(out, "(b t) h d -> b t h d", b=B)


# ------------------------------------------------------- incremental
def cached_attend(q, k, v, *, mask: torch.Tensor | None):
    """New queries of one stream against its cached keys/values (docs/design.md §5).

    Args:
        q: `[1, t, H, D]` queries of the new tokens (token-major, as projected).
        k, v: `[1, Hkv, S, D]` cached keys/values (head-major, as `KVCache` stores them).
        mask: bool `[t, S]` from `core.layout.cached_mask` (True = attend), or
            None when every key is visible to every query (one decoded token).
    Returns:
        `[1, t, H, D]`, dtype of `q`.

    Without a mask (decode), the query heads that share a key/value head are
    folded into the query length (`[1, Hkv, g * t, D]`), so that grouped-query
    attention reads the cache once, in place; SDPA's `enable_gqa` path is ~2x
    slower there on CPU. With a mask (a chunk), `enable_gqa` and the `[t, S]`
    mask broadcast over heads are the faster of the two.
    """
    if (kernels_on() and q.shape[0] == 1 and q.shape[1] <= KERNEL_MAX_TOKENS
            and q.shape[-1] <= cpu_kernels.MAX_HEAD_DIM and (mask is None or mask.dim() == 2)
            and cpu_kernels.usable(q, k, v)):
        return _cached_kernel(q, k, v, mask)
    if mask is not None:
        out = F.scaled_dot_product_attention(_heads_first(q), k, v, attn_mask=mask, enable_gqa=True)
        return _tokens_first(out)
    B, t, H, D = q.shape
    Hkv = k.shape[1]
    if t == 1:  # one decoded token: the fold is a view (the einops below, without its parsing cost)
        return F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, D), k, v).view(B, 1, H, D)
    # query head h reads key/value head h // g (grouped-query), hence "(hkv g)"
    grouped = rearrange(q, "b t (hkv g) d -> b hkv (g t) d", hkv=Hkv)
    out = F.scaled_dot_product_attention(grouped, k, v)
    return rearrange(out, "b hkv (g t) d -> b t (hkv g) d", t=t)


def _cached_kernel(q, k, v, mask):
    """`cached_attend` through `cpu_kernels.attend` (one stream: B == 1)."""
    B, t, H, D = q.shape
    Hkv = k.shape[1]
    if t == 1:  # the fold below is a view here (no einops parsing on the per-token path)
        out = cpu_kernels.attend(q.view(Hkv, H // Hkv, D), k[0], v[0], scale=D ** -0.5)
        return out.to(q.dtype).view(B, 1, H, D)
    grouped = rearrange(q, "b t (hkv g) d -> (b hkv) (g t) d", hkv=Hkv)  # query row r reads mask row r % t
    out = cpu_kernels.attend(grouped, k[0], v[0], mask, scale=D ** -0.5)
    return rearrange(out.to(q.dtype), "(b hkv) (g t) d -> b t (hkv g) d", b=B, t=t)
