"""From insertion points and documents to windows, and from windows to masks.

This module is the single source of truth for the CASA mask (docs/design.md
§4), for a whole batch (`build_layout`, `Layout`) and for one stream fed
incrementally (`StreamWindows`, `cached_mask`, `History`; docs/design.md §5).

Conventions:
- text is a `[B, T]` grid; "flat" text index is `b * T + t`;
- image tokens are flat `[N_tok, ...]` (N_tok = sum of each image's token
  count; images may differ, e.g. Qwen2.5-VL's dynamic resolution), images
  sorted by (row, insertion point), so the image tokens of one window are
  contiguous;
- windows get global ids in flat text order, so a window is a contiguous run
  of flat text indices;
- every key carries an "order": its text index, or for an image token the
  insertion point of its image. A query at text index `t` sees a key of its
  own window iff `order <= t`. That one rule gives the bottom-right causal mask
  of §4 for every backend, and the incremental mask of `cached_mask`.

Design decisions:
- `Layout` is computed once per batch and shared by every layer; each
  backend's view of it (dense mask, folded windows, FlexAttention BlockMask,
  varlen offsets) is built lazily on first use and cached.
- A window starts at every document start and at every distinct insertion
  point (`window_starts`). The batch builder and the streaming tracker
  (`StreamWindows`) both apply that one function, and a test checks that a
  stream fed piece by piece gets the windows of the batch.
- The bounded history of a stream (`History`: attention sink + sliding window)
  is a mask rule too, so it lives here (`History.keeps`); the KV cache only
  decides where kept entries are stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange

__all__ = ["FoldedWindows", "History", "Layout", "Splice", "StreamWindows", "build_layout", "build_memory",
           "build_splice", "cached_mask", "image_token_counts", "window_starts"]


@dataclass
class FoldedWindows:
    """Windows folded into the batch dimension, padded to the longest one."""

    text_index: torch.Tensor  # [W, L] flat text index (padded with 0)
    text_valid: torch.Tensor  # [W, L]
    image_index: torch.Tensor  # [W, N] flat image-token index (padded with 0)
    image_valid: torch.Tensor  # [W, N]
    has_image: torch.Tensor  # [W]
    uniform: bool  # no padding anywhere: the mask is the same for all windows

    def mask(self, text_keys: bool) -> torch.Tensor:
        """Boolean attention mask `[W, 1, L, N (+ L)]`, True = attend."""
        W, L = self.text_index.shape
        image_part = self.image_valid[:, None, None, :].expand(W, 1, L, -1)
        if not text_keys:
            return image_part
        causal = torch.ones(L, L, dtype=torch.bool, device=self.text_index.device).tril()
        text_part = causal[None, None] & self.text_valid[:, None, None, :]
        return torch.cat([image_part, text_part], dim=-1)


@dataclass
class Layout:
    """Windows, positions and per-backend views for one interleaved batch."""

    batch_size: int
    seq_len: int
    image_tokens: torch.Tensor  # [N_img] long, tokens of each image
    text_window: torch.Tensor  # [B, T] global window id
    text_doc: torch.Tensor  # [B, T] global document id
    text_pos: torch.Tensor  # [B, T] position within the document (text tokens only)
    image_row: torch.Tensor  # [N_img]
    image_point: torch.Tensor  # [N_img] insertion point
    image_window: torch.Tensor  # [N_img]
    single_doc_rows: bool  # every row is one document: plain causal SA
    _cache: dict = field(default_factory=dict, repr=False)

    # ----------------------------------------------------------------- basics
    @property
    def device(self) -> torch.device:
        return self.text_window.device

    @property
    def n_windows(self) -> int:
        return int(self.text_window.max()) + 1 if self.text_window.numel() else 0

    @property
    def n_images(self) -> int:
        return self.image_row.numel()

    @property
    def n_image_tokens(self) -> int:
        """N_tok, image tokens of the batch."""
        return int(self.image_tokens.sum())

    def image_token_attr(self, per_image: torch.Tensor) -> torch.Tensor:
        """Repeat a per-image attribute for each of its tokens: `[N_img] -> [N_tok]`."""
        return per_image.repeat_interleave(self.image_tokens)

    def tokens_per(self, group: torch.Tensor, size: int) -> torch.Tensor:
        """Image tokens per group: `group [N_img]` ids in `[0, size)` -> `[size]` long counts."""
        return torch.zeros(size, dtype=torch.long, device=self.device).index_add_(0, group, self.image_tokens)

    @property
    def image_pos(self) -> torch.Tensor:
        """RoPE position of each image: that of the text token at its insertion point."""
        return self.text_pos[self.image_row, self.image_point]

    def cached(self, key, build):
        """`build()`, computed once per layout and key (backend views, block masks)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # ------------------------------------------------- dense, per-row keys
    def dense_keys(self):
        """Keys per row as `[images of the row (padded) ; text of the row]`.

        Returns `(image_index [B, K], image_valid [B, K], key_window [B, K+T],
        key_order [B, K+T])`.
        """

        def build():
            B, T, dev = self.batch_size, self.seq_len, self.device
            per_row = self.tokens_per(self.image_row, B)
            K = int(per_row.max()) if self.n_images else 0
            first = torch.cumsum(per_row, 0) - per_row  # first image token of each row
            slot = torch.arange(K, device=dev)
            image_valid = slot[None, :] < per_row[:, None]
            image_index = torch.where(image_valid, first[:, None] + slot[None, :], 0)
            tok_window = self.image_token_attr(self.image_window)
            tok_order = self.image_token_attr(self.image_point)
            img_window = torch.where(image_valid, tok_window[image_index] if K else image_index, -1)
            img_order = torch.where(image_valid, tok_order[image_index] if K else image_index, 0)
            text_order = torch.arange(T, device=dev).expand(B, T)
            key_window = torch.cat([img_window, self.text_window], dim=1)
            key_order = torch.cat([img_order, text_order], dim=1)
            return image_index, image_valid, key_window, key_order

        return self.cached("dense_keys", build)

    def dense_mask(self, text_keys: bool) -> torch.Tensor:
        """The reference CASA mask `[B, 1, T, K (+T)]` over `dense_keys`."""

        def build():
            image_index, _, key_window, key_order = self.dense_keys()
            if not text_keys:
                K = image_index.shape[1]
                key_window, key_order = key_window[:, :K], key_order[:, :K]
            q_order = torch.arange(self.seq_len, device=self.device)
            same = key_window[:, None, :] == self.text_window[:, :, None]
            return (same & (key_order[:, None, :] <= q_order[None, :, None]))[:, None]

        return self.cached(("dense_mask", text_keys), build)

    # ------------------------------------------------------ folded windows
    def folded(self) -> FoldedWindows:
        def build():
            text_index, text_valid = _fold_runs(self.text_window)
            img_per_window = self.tokens_per(self.image_window, text_index.shape[0])
            img_starts = torch.cumsum(img_per_window, 0) - img_per_window
            N = int(img_per_window.max()) if self.n_images else 0
            i = torch.arange(N, device=self.device)
            image_valid = i[None] < img_per_window[:, None]
            image_index = torch.where(image_valid, img_starts[:, None] + i[None], 0)
            uniform = bool(text_valid.all()) and bool(image_valid.all())
            return FoldedWindows(text_index, text_valid, image_index, image_valid, img_per_window > 0, uniform)

        return self.cached("folded", build)

    def folded_documents(self):
        """Documents folded into the batch: `(index [D, L], valid [D, L])` over the flat text."""
        return self.cached("folded_documents", lambda: _fold_runs(self.text_doc))

    # ------------------------------------------------------ varlen offsets
    def varlen(self, text_keys: bool):
        """Offsets for `flash_attn_varlen_func`, one sequence per window:
        queries are the window's text, keys `[its image tokens ; its text]`.
        Without text keys, windows without an image are left out (their
        update is zero) so that no sequence has zero keys.

        Returns `(q_index, key_index, cu_q, cu_k, max_q, max_k)`: `q_index`
        indexes the flat text, `key_index` indexes `cat([image tokens, flat text])`.
        """

        def build():
            fw = self.folded()
            keep = fw.has_image if not text_keys else torch.ones_like(fw.has_image)
            q_valid = fw.text_valid & keep[:, None]
            parts = [torch.where(fw.image_valid & keep[:, None], fw.image_index, -1)]
            if text_keys:
                parts.append(torch.where(q_valid, fw.text_index + self.n_image_tokens, -1))
            keys = torch.cat(parts, dim=1).flatten()
            q_len = q_valid.sum(1)[keep]
            k_len = fw.image_valid.sum(1)[keep] + (q_len if text_keys else 0)
            zero = torch.zeros(1, dtype=torch.int32, device=self.device)
            cu_q = torch.cat([zero, q_len.cumsum(0).int()])
            cu_k = torch.cat([zero, k_len.cumsum(0).int()])
            max_q = int(q_len.max()) if len(q_len) else 0
            max_k = int(k_len.max()) if len(k_len) else 0
            return fw.text_index[q_valid], keys[keys >= 0], cu_q, cu_k, max_q, max_k

        return self.cached(("varlen", text_keys), build)

    # --------------------------------------------- text self-attention mask
    def causal_mask(self) -> torch.Tensor | None:
        """`[B, 1, T, T]` causal mask within documents, or None when `is_causal` suffices."""

        def build():
            if self.single_doc_rows:
                return None
            T = self.seq_len
            causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
            same_doc = self.text_doc[:, :, None] == self.text_doc[:, None, :]
            return (same_doc & causal)[:, None]

        return self.cached("causal_mask", build)

    def to(self, device) -> "Layout":
        moved = {
            k: getattr(self, k).to(device)
            for k in ("image_tokens", "text_window", "text_doc", "text_pos", "image_row", "image_point",
                      "image_window")
        }
        return Layout(self.batch_size, self.seq_len, **moved,
                      single_doc_rows=self.single_doc_rows)


def image_token_counts(tokens_per_image: int | torch.Tensor, n_images: int) -> torch.Tensor:
    """`[N_img]` long token counts from one count for all images or a per-image tensor (on the CPU)."""
    if isinstance(tokens_per_image, torch.Tensor):
        counts = tokens_per_image.long().cpu().reshape(-1)
        if counts.numel() != n_images:
            raise ValueError(f"image token counts: {counts.numel()} entries for {n_images} images")
        return counts
    return torch.full((n_images,), int(tokens_per_image), dtype=torch.long)


def _ranks(counts: torch.Tensor) -> torch.Tensor:
    """`[0..c0-1, 0..c1-1, ...]` for long `counts [N]` -> `[sum(counts)]`."""
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(int(counts.sum())) - starts.repeat_interleave(counts)


def _fold_runs(group: torch.Tensor):
    """Runs of equal ids (0, 1, ... in flat order) as padded rows of flat indices."""
    flat = group.flatten()
    lengths = torch.bincount(flat)
    starts = torch.cumsum(lengths, 0) - lengths
    t = torch.arange(int(lengths.max()), device=flat.device)
    valid = t[None] < lengths[:, None]
    return torch.where(valid, starts[:, None] + t[None], 0), valid


def window_starts(doc_start: torch.Tensor, image_rows: torch.Tensor, insertion_points: torch.Tensor) -> torch.Tensor:
    """Where windows start (docs/design.md §2): at every document start and at
    every image insertion point.

    Consecutive images (same insertion point) therefore share a window, and an
    image at a document start opens no extra one. `StreamWindows` applies the
    same rule to a stream fed piece by piece.

    Args:
        doc_start: `[B, T]` bool, True at the first text token of each document.
        image_rows, insertion_points: `[N_img]` long, row and insertion point of each image.
    Returns:
        `[B, T]` bool, True at the first text token of each window.
    """
    start = doc_start.clone()
    start[image_rows, insertion_points] = True
    return start


def build_layout(
    seq_len: int,
    doc_lens: list[list[int]],
    image_rows: torch.Tensor,
    insertion_points: torch.Tensor,
    tokens_per_image: int | torch.Tensor,
    device=None,
) -> Layout:
    """Windows of docs/design.md §2 from documents and insertion points.

    Windows start where `window_starts` says; so text before a document's first
    image is a text-only window, and no window crosses a document boundary.
    Inputs are assumed valid (see `batch.py`).

    Args:
        seq_len: T, text tokens per row.
        doc_lens: per row, the lengths of its packed documents (adding up to T).
        image_rows, insertion_points: `[N_img]` long, sorted by (row, point).
        tokens_per_image: n, tokens of every image, or `[N_img]` long, each image's own count.
    """
    B, T = len(doc_lens), seq_len
    image_rows = image_rows.long().cpu()
    insertion_points = insertion_points.long().cpu()
    image_tokens = image_token_counts(tokens_per_image, len(image_rows))
    doc_start = torch.zeros(B, T, dtype=torch.bool)
    text_doc = torch.zeros(B, T, dtype=torch.long)
    text_pos = torch.zeros(B, T, dtype=torch.long)
    doc_counter = 0
    for b, lens in enumerate(doc_lens):
        start = 0
        for length in lens:
            doc_start[b, start] = True
            text_doc[b, start : start + length] = doc_counter
            text_pos[b, start : start + length] = torch.arange(length)
            doc_counter += 1
            start += length
    # window ids count window starts in flat text order (so windows are contiguous runs of flat text)
    starts = window_starts(doc_start, image_rows, insertion_points)
    text_window = rearrange(torch.cumsum(starts.flatten().long(), 0), "(b t) -> b t", b=B) - 1
    image_window = text_window[image_rows, insertion_points]
    layout = Layout(
        batch_size=B,
        seq_len=T,
        image_tokens=image_tokens,
        text_window=text_window,
        text_doc=text_doc,
        text_pos=text_pos,
        image_row=image_rows,
        image_point=insertion_points,
        image_window=image_window,
        single_doc_rows=all(len(lens) == 1 for lens in doc_lens),
    )
    return layout if device is None else layout.to(device)


@dataclass
class Splice:
    """Where text and image tokens land in the `insertion` variant's spliced rows."""

    text_index: torch.Tensor  # [B, T] position of each text token in its spliced row
    image_row: torch.Tensor  # [N_tok] spliced row of each image token
    image_index: torch.Tensor  # [N_tok] position of each image token in that row
    layout: Layout  # text-only layout of the spliced rows (documents, positions)
    doc_lens: list[list[int]] | None = None  # per spliced row, its documents' lengths (padding one included)


def build_splice(
    seq_len: int,
    doc_lens: list[list[int]],
    image_rows: torch.Tensor,
    insertion_points: torch.Tensor,
    tokens_per_image: int | torch.Tensor,
    device=None,
) -> Splice:
    """Image tokens spliced before their insertion point; documents grow by
    the image tokens they hold; spliced rows are padded at the end with one
    padding document. `tokens_per_image` is one count for all images or `[N_img]` long."""
    B, T = len(doc_lens), seq_len
    image_rows = image_rows.long().cpu()
    points = insertion_points.long().cpu()
    counts = image_token_counts(tokens_per_image, len(points))
    before = torch.zeros(B, T + 1, dtype=torch.long)  # image tokens inserted at each point
    before.index_put_((image_rows, points), counts, accumulate=True)
    shift = torch.cumsum(before[:, :T], dim=1)  # image tokens at or before each text token
    text_index = torch.arange(T)[None] + shift
    earlier = torch.zeros_like(points)  # image tokens of the same row before each image
    for b in range(B):
        sel = image_rows == b
        row_counts = counts[sel]
        earlier[sel] = torch.cumsum(row_counts, 0) - row_counts
    first = points + earlier
    image_index = first.repeat_interleave(counts) + _ranks(counts)
    lengths = T + torch.zeros(B, dtype=torch.long).index_add_(0, image_rows, counts)
    S = int(lengths.max())
    spliced_docs = []
    for b, lens in enumerate(doc_lens):
        row_pts, row_counts = points[image_rows == b], counts[image_rows == b]
        docs, start = [], 0
        for length in lens:
            in_doc = int(row_counts[(row_pts >= start) & (row_pts < start + length)].sum())
            docs.append(length + in_doc)
            start += length
        if S > int(lengths[b]):
            docs.append(S - int(lengths[b]))
        spliced_docs.append(docs)
    empty = torch.zeros(0, dtype=torch.long)
    layout = build_layout(S, spliced_docs, empty, empty, 1)
    splice = Splice(text_index, image_rows.repeat_interleave(counts), image_index, layout, spliced_docs)
    if device is not None:
        splice = Splice(splice.text_index.to(device), splice.image_row.to(device),
                        splice.image_index.to(device), layout.to(device), spliced_docs)
    return splice


def build_memory(
    seq_len: int,
    doc_lens: list[list[int]],
    image_rows: torch.Tensor,
    insertion_points: torch.Tensor,
    tokens_per_image: int | torch.Tensor,
    memory: int,
    device=None,
) -> tuple[Splice, Layout]:
    """Frame memory (`FusionConfig.frame_memory`): `memory` tokens per image spliced before its
    insertion point by insertion's rule (`build_splice`), and the windows of the longer rows.

    The memory tokens are text of the image's window: every image keeps its window, which now starts
    at the first memory token of its group (images sharing an insertion point put theirs one after
    the other, image-major), so they read their images in fusion layers and stay in the stream for
    every later token. Positions count them (`Layout.text_pos` of the longer rows).

    Returns:
        `(splice, layout)`: where text and memory tokens land (`Splice`, `memory` tokens per image),
        and the `Layout` of the spliced rows with each image (`tokens_per_image` tokens) at its new
        insertion point.
    """
    rows, points = image_rows.long().cpu(), insertion_points.long().cpu()
    splice = build_splice(seq_len, doc_lens, rows, points, memory, device=device)
    at = torch.zeros(len(doc_lens), seq_len + 1, dtype=torch.long)  # memory tokens spliced at each point
    at.index_put_((rows, points), torch.full_like(points, memory), accumulate=True)
    before = torch.cumsum(at, dim=1) - at  # ... strictly before it
    layout = build_layout(splice.layout.seq_len, splice.doc_lens, rows, points + before[rows, points],
                          tokens_per_image)
    return splice, layout if device is None else layout.to(device)


# ----------------------------------------------------------- one stream, incrementally
@dataclass(frozen=True)
class History:
    """Bounded history of a stream: an attention sink plus a sliding window.

    A query at absolute index `q` (its index among the entries of one cache)
    sees the first `sink` entries and the `window` most recent ones, itself
    included; nothing else. Positions are not recycled (docs/design.md §5).
    """

    sink: int = 4
    window: int = 1024

    def __post_init__(self):
        if self.sink < 0:
            raise ValueError(f"History.sink={self.sink}: must be >= 0")
        if self.window < 1:
            raise ValueError(f"History.window={self.window}: must be >= 1")

    def sees(self, key_index: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
        """Whether a query sees an earlier key under this history (broadcasting long
        tensors of absolute indices; the caller also requires `key <= query`).

        A cache need hold only what its newest entry sees: the next entry then
        overwrites the one entry it no longer sees (the oldest of the window).
        """
        return (key_index < self.sink) | (query_index - key_index < self.window)


class StreamWindows:
    """The window rule of `window_starts` for one stream (one document) fed
    piece by piece: images and text arrive in order, images before the text
    token they precede.

    Since insertion points only grow, an image opens a new window unless its
    insertion point (the number of text tokens so far) already starts one,
    i.e. equals the current window's start.
    """

    def __init__(self) -> None:
        self.text_tokens = 0  # text tokens fed so far: the insertion point of the next image
        self.window_start = 0  # text index where the current window starts (the document start at first)
        self.window = 0  # id of the current window, as `build_layout` numbers them

    @property
    def window_text(self) -> int:
        """Text tokens in the current window so far."""
        return self.text_tokens - self.window_start

    def add_text(self, n: int) -> None:
        self.text_tokens += n

    def add_images(self) -> bool:
        """Images arrive before the next text token; returns True if they open a new
        window (the caller then starts a fresh fusion state)."""
        opens = self.text_tokens != self.window_start
        if opens:
            self.window_start = self.text_tokens
            self.window += 1
        return opens


def cached_mask(query_index: torch.Tensor, key_index: torch.Tensor, *, n_prefix: int,
                history: History | None) -> torch.Tensor:
    """Which cached keys new queries of one stream see (the §4 rule, incrementally).

    Keys are `[prefix ; tokens]`: the prefix is a window's image tokens, whose
    order (their insertion point) is at or before every query of the window,
    so they are always visible; a token key is visible iff it is not after the
    query (`order <= t`) and, with a bounded history, `history.sees` it.

    Args:
        query_index: `[t]` long, absolute index of each new query among the cache's tokens.
        key_index: `[S]` long, absolute index of each token key (the new ones included).
        n_prefix: P, always-visible entries before the token keys.
        history: the bounded-history rule, or None for the whole history.
    Returns:
        `[t, P + S]` bool, True = attend.
    """
    q, k = query_index[:, None], key_index[None, :]
    visible = k <= q
    if history is not None:
        visible = visible & history.sees(k, q)
    prefix = torch.ones(len(query_index), n_prefix, dtype=torch.bool, device=query_index.device)
    return torch.cat([prefix, visible], dim=1)
