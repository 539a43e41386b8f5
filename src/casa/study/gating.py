"""Implicit-gating analysis of fusion layers (`casa study`).

In a CASA layer a text query spends one softmax over `[window images ;
window text up to itself]`, so the share of attention mass that goes to image
keys acts as an input-dependent gate (docs/design.md §1). This module measures it:

- `attention_shares(model, batch)`: runs one forward with the fusion layers'
  attention recomputed from their q/k and the layout's dense reference mask
  (`Layout.dense_keys`, `Layout.dense_mask`); per fusion layer, the mean
  share of mass that text queries put on image keys, on text keys and on
  their own key. Only queries whose window holds an image count (others
  have nothing to gate); `answer` restricts to answer tokens.
- `gate_values(model)`: `tanh(alpha)` of each gated_ca layer (attention and
  FFN gates), the explicit gates CASA's softmax replaces.
- `forward_recording(model, batch, records, measure)`: the same forward
  with any measure of the fusion layers' queries and keys (`gate_tokens.py`
  measures single tokens with it).

Design decisions:
- The model's outputs are untouched: each fusion layer's `probe` sees its
  queries and keys just before attention, and is removed afterwards.
- The shares are recomputed densely from q/k and the layout's reference mask
  (scale `1/sqrt(head_dim)`, query head `h` reading kv head
  `h // (n_heads / n_kv_heads)`, as every attention backend does), not read
  from a backend, so one definition serves every backend.
- Shares are averaged over heads, then over queries; a query with no key
  (a window without image and without text keys) counts zero everywhere and
  is left out by the has-image selection.
"""

from __future__ import annotations

import contextlib
import math

import torch

__all__ = ["attention_probs", "attention_shares", "forward_recording", "gate_values"]


def attention_probs(q, k_txt, k_img, layout, text_keys: bool, where=None):
    """Attention probabilities over the layout's dense keys `[images of the row ; text of the row]`.

    Args:
        q: `[B, T, H, D]` queries; k_txt: `[B, T, Hkv, D]` text keys (None without text keys);
        k_img: `[N_tok, Hkv, D]` flat image keys;
        where: None (every query) or `(rows [Q], cols [Q])` long, the queries to score.
    Returns:
        `(p, K)`: p `[B, H, T, K (+T)]`, or `[Q, H, 1, K (+T)]` with `where` (each selected query a row
        of its own); K = image key slots per row. Rows without a key are all zero.
    """
    image_index = layout.dense_keys()[0]
    K = image_index.shape[1]
    k = k_img[image_index] if K else q.new_zeros(q.shape[0], 0, k_img.shape[-2], q.shape[-1])
    if text_keys:
        k = torch.cat([k, k_txt], dim=1)
    mask = layout.dense_mask(text_keys)[:, 0]  # [B, T, K(+T)]
    if where is not None:
        rows, cols = where
        q, k, mask = q[rows, cols][:, None], k[rows], mask[rows, cols][:, None]
    H, Hkv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask[:, None], float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0), K


def _shares(q, k_txt, k_img, layout, text_keys: bool):
    """Per query `[B, T]` float: mass on image keys, on text keys, on itself (head mean); and has-image (bool).

    Args:
        q: `[B, T, H, D]` queries; k_txt: `[B, T, Hkv, D]` text keys (None without text keys);
        k_img: `[N_img * n, Hkv, D]` flat image keys.
    """
    p, K = attention_probs(q, k_txt, k_img, layout, text_keys)
    img = p[..., :K].sum(-1).mean(1)
    txt = p[..., K:].sum(-1).mean(1)
    self_mass = torch.diagonal(p[..., K:], dim1=-2, dim2=-1).mean(1) if text_keys else torch.zeros_like(img)
    has_image = layout.dense_mask(text_keys)[:, 0, :, :K].any(-1)  # [B, T]
    return img, txt, self_mass, has_image


@contextlib.contextmanager
def _recording(model, records: dict, measure=_shares):
    """Set each fusion layer's probe to record `measure(q, k_txt, k_img, layout, text_keys)`, by block index."""
    layers = [(i, b.fusion) for i, b in enumerate(model.blocks) if b.fusion is not None]
    for i, layer in layers:
        layer.probe = lambda q, k_txt, k_img, layout, text_keys, i=i: records.setdefault(i, []).append(
            measure(q, k_txt, k_img, layout, text_keys))
    try:
        yield
    finally:
        for _, layer in layers:
            layer.probe = None


def forward_recording(model, batch, records: dict, measure, backend: str = "auto") -> None:
    was_training = model.training
    model.eval()
    try:
        with _recording(model, records, measure):
            model(batch, backend=backend)
    finally:
        model.train(was_training)


@torch.no_grad()
def attention_shares(model, batch, *, backend: str = "auto") -> dict[int, dict]:
    """`{block index: {image, text, self, answer_image, answer_text, answer_self, queries}}`.

    Means over text queries that have an image in their window (`answer_*`:
    over the answer tokens among them, `batch.loss_mask`).
    """
    records: dict = {}
    forward_recording(model, batch, records, _shares, backend)
    answer = batch.loss_mask.bool() if batch.loss_mask is not None else None
    out = {}
    for layer, calls in records.items():
        img, txt, slf, has = calls[-1]
        sel = has
        row = {"queries": int(sel.sum())}
        for name, x in (("image", img), ("text", txt), ("self", slf)):
            row[name] = float(x[sel].mean()) if sel.any() else None
        if answer is not None:
            a = sel & answer.to(sel.device)
            for name, x in (("image", img), ("text", txt), ("self", slf)):
                row[f"answer_{name}"] = float(x[a].mean()) if a.any() else None
        out[int(layer)] = row
    return out


def gate_values(model) -> dict[int, dict]:
    """`{block index: {attn, ffn}}`: tanh of the gated_ca gates (empty for other variants)."""
    out = {}
    for i, block in enumerate(model.blocks):
        f = block.fusion
        if f is not None and hasattr(f, "attn_gate"):
            out[i] = {"attn": float(torch.tanh(f.attn_gate).item()), "ffn": float(torch.tanh(f.ffn_gate).item())}
    return out
