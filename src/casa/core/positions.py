"""Multimodal RoPE positions (Qwen2.5-VL's M-RoPE, docs/design.md §5).

A model whose `LMConfig.mrope_section` is set rotates queries and keys with
3-component positions `(t, h, w)`; this module is the one home of the rule
that assigns them. Models without it keep 1-D positions (`Layout.text_pos`)
and never call this module.

The rule, for an image (or a video) whose grid in LM tokens is `(gt, gh, gw)`
placed at running position `p`:

- its token at frame `i`, row `r`, column `c` sits at
  `(p + floor(i * interval), p + r, p + c)`, where `interval` is 1 for a still
  image and `tokens_per_second * seconds_per_grid` for a video;
- the text after it continues at `p + max(gh, gw)`;
- text tokens sit at `(q, q, q)`.

That is transformers' `get_rope_index` (`Qwen2_5_VLModel`), which the
`insertion` variant reproduces exactly: its image tokens are in the stream.

Design decisions:
- Fused variants (`casa`, `ca`, ...): image tokens occupy no text position,
  so text positions are the 1-D ones repeated over the three components, and
  an image's keys take the grid rule above with `p` its insertion point's
  position and the temporal component pinned at `p` (the paper: spatial
  components from the patch grid, time fixed at the insertion point). Only
  `casa` rotates image keys at all (`FusionLayer.positional`).
- Positions are `[..., 3]` long tensors (last dim t, h, w), so they index
  like the 1-D ones they extend.
- A document restarts positions at 0, as packed rows do for 1-D RoPE.
"""

from __future__ import annotations

import torch
from einops import repeat

from casa.core.layout import Layout, Splice

__all__ = ["fused_image_positions", "grid_positions", "spliced_positions", "text_positions"]


def grid_positions(start: int, grid: tuple[int, int, int], *, interval: float = 1.0, pin_time: bool = False,
                   device=None) -> torch.Tensor:
    """Positions of one image's (or video's) tokens, in its frame-row-column order.

    Args:
        start: p, the running position where the image sits.
        grid: `(gt, gh, gw)`, its tokens per frame axis, row and column (LM tokens).
        interval: temporal step between frames (1 for images).
        pin_time: every frame at `p` (fused variants) instead of `p + floor(i * interval)`.
    Returns:
        `[gt * gh * gw, 3]` long.
    """
    gt, gh, gw = (int(x) for x in grid)
    t = torch.zeros(gt, dtype=torch.long, device=device) if pin_time else \
        (torch.arange(gt, device=device) * interval).long()
    h, w = torch.arange(gh, device=device), torch.arange(gw, device=device)
    grids = torch.meshgrid(t, h, w, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=-1) + start


def text_positions(positions_1d: torch.Tensor) -> torch.Tensor:
    """Text tokens: `[...]` long 1-D positions -> `[..., 3]` (the same in every component)."""
    return repeat(positions_1d, "... -> ... c", c=3)


def fused_image_positions(layout: Layout, grids: torch.Tensor) -> torch.Tensor:
    """Key positions of every image token for the fused variants: the grid rule at the
    insertion point's position, time pinned there.

    Args:
        layout: the batch's windows (`image_pos`, the insertion point positions).
        grids: `[N_img, 3]` long, each image's `(gt, gh, gw)`.
    Returns:
        `[N_tok, 3]` long, image-major (the flat image-token order).
    """
    starts = layout.image_pos.tolist()
    parts = [grid_positions(p, g.tolist(), pin_time=True) for p, g in zip(starts, grids.cpu())]
    if not parts:
        return torch.zeros(0, 3, dtype=torch.long, device=layout.device)
    return torch.cat(parts).to(layout.device)


def spliced_positions(splice: Splice, grids: torch.Tensor, intervals: torch.Tensor) -> torch.Tensor:
    """Positions of the `insertion` variant's spliced rows (transformers' `get_rope_index`).

    Args:
        splice: where text and image tokens land (`core.layout.build_splice`).
        grids: `[N_img, 3]` long, each image's `(gt, gh, gw)` in LM tokens.
        intervals: `[N_img]` float, temporal step of each (1 for images).
    Returns:
        `[B, S, 3]` long; a padding document counts on like text.
    """
    layout = splice.layout
    B, S = layout.batch_size, layout.seq_len
    counts = grids.prod(-1).cpu()
    owner = torch.full((B, S), -1, dtype=torch.long)  # image of each spliced slot, -1 for text
    owner[splice.image_row.cpu(), splice.image_index.cpu()] = torch.arange(len(counts)).repeat_interleave(counts)
    doc = layout.text_doc.cpu()
    out = torch.zeros(B, S, 3, dtype=torch.long)
    for b in range(B):
        s, pos = 0, 0
        while s < S:
            if s == 0 or doc[b, s] != doc[b, s - 1]:
                pos = 0
            i = int(owner[b, s])
            if i < 0:  # a run of text up to the next image or document start
                end = s + 1
                while end < S and owner[b, end] < 0 and doc[b, end] == doc[b, s]:
                    end += 1
                out[b, s:end] = text_positions(torch.arange(pos, pos + end - s))
                pos += end - s
                s = end
            else:
                g = grids[i].tolist()
                out[b, s:s + int(counts[i])] = grid_positions(pos, g, interval=float(intervals[i]))
                pos += max(g[1], g[2])
                s += int(counts[i])
    return out.to(layout.device)
