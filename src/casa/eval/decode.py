"""Greedy decoding of evaluation prompts, batched and cached, for every fusion variant.

Used by `casa eval` (synthetic tasks and JSONL), the trainer's periodic
evaluation, the study, the standard benchmarks and the lmms-eval plugin.

Design decisions:
- Cached: images are encoded once for all prompts; each prompt is prefilled
  in its own `inference.Session` (images added at their insertion points,
  text in chunks between them), which handles every variant's windows and
  positions; then all rows decode together, one token per row per step,
  through `inference.rows.RowDecoder` (caches padded into one batch). The
  cost is one prefill per prompt plus one batched one-token forward per
  answer token, instead of a full forward over every row per answer token.
- `greedy_decode_uncached` keeps the plain path (right-padded rows, one full
  forward per step, the padding a document of its own): the reference the
  cached path is tested against, and the baseline of `casa bench decode`.
- A row stops at its first stop token (`Processor.stop_ids`), which is not
  part of the answer, or after `max_new_tokens`.
- A prompt longer than the model's budget is refused before any forward
  (`check_lengths`), with a message naming the sample, instead of running
  for minutes and exhausting memory.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from casa.data import Encoded, Processor, stack_rows
from casa.data.packing import sequence_tokens
from casa.data.sample import DataError
from casa.inference.rows import RowDecoder
from casa.inference.session import Session

__all__ = ["PromptTooLong", "check_lengths", "greedy_decode", "greedy_decode_uncached"]


class PromptTooLong(DataError):
    """An evaluation prompt (plus its answer budget) longer than the model's token limit."""


def check_lengths(prompts: list[Encoded], processor: Processor, *, max_new_tokens: int, limit: int,
                  splice_images: bool, memory_tokens: int = 0, limit_source: str = "the token limit") -> None:
    """Refuse any prompt whose decoding would exceed `limit` sequence positions.

    Args:
        prompts: encoded prompts (`Encoded.ids` are the prompt's token ids).
        max_new_tokens: the answer budget each prompt decodes into.
        limit: the most sequence positions a row may reach.
        splice_images: the `insertion` variant: image tokens sit in the sequence too.
        memory_tokens: pooled image tokens per image kept in the sequence (`FusionConfig.frame_memory`).
        limit_source: where `limit` comes from, for the message.
    Raises:
        PromptTooLong: naming the first offending prompt's source and both lengths.
    """
    for p in prompts:
        need = sequence_tokens(p, processor.tokens_per_image, splice_images=splice_images,
                               memory_tokens=memory_tokens) + max_new_tokens
        if need > limit:
            raise PromptTooLong(
                f"{p.source}: the prompt needs {need:,} tokens ({len(p.ids):,} prompt tokens"
                + (f", {p.n_images * processor.tokens_per_image:,} image tokens" if splice_images else "")
                + (f", {p.n_images * memory_tokens:,} memory tokens" if memory_tokens else "")
                + f", {max_new_tokens} answer tokens), over the model's limit of {limit:,} ({limit_source}); "
                "shorten the sample or raise the limit with --max-tokens")


@torch.no_grad()
def greedy_decode(model, prompts: list[Encoded], processor: Processor, *, max_new_tokens: int = 24,
                  backend: str = "auto") -> list[list[int]]:
    """Greedy continuation of each prompt (cached, batched; see the module docstring).

    Args:
        model: a `CasaModel` (its mode is left as it is; call `.eval()` first).
        prompts: encoded prompts with their pixels (`Processor.encode` / `Encoded.prefix`).
        max_new_tokens: the most tokens generated per prompt.
    Returns:
        per prompt, the generated token ids, stop token excluded; the same as
        `greedy_decode_uncached`.
    """
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    batch = stack_rows(prompts, processor.tok.pad_id).to(device)
    embeds = model.encode_images(batch)  # [N, n, d] or a list of [n_i, d]: every prompt's images in order
    grids = batch.image_grids  # [N, 3] for images of their own sizes (M-RoPE), else None
    sessions, first = [], 0
    for p in prompts:
        session = Session(model, backend=backend)
        last = first + p.n_images
        _prefill(session, p, embeds[first:last], None if grids is None else grids[first:last])
        first = last
        sessions.append(session)
    logits = torch.stack([s.last_logits for s in sessions])  # [B, vocab]
    decoder = None
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    stop = set(processor.stop_ids)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1).tolist()
        for b, tok in enumerate(nxt):
            if done[b]:
                continue
            if tok in stop:
                done[b] = True
                continue
            out[b].append(tok)
        if all(done) or step == max_new_tokens - 1:
            break
        if decoder is None:
            decoder = RowDecoder(sessions, max_new_tokens=max_new_tokens)
        logits = decoder.step(torch.tensor(nxt, dtype=torch.long))
    return out


def _prefill(session: Session, prompt: Encoded, embeds, grids: torch.Tensor | None) -> None:
    """Feed one prompt: each image before the text token at its insertion point
    (precomputed `embeds`, `[n_images, n, d]` or a list of `[n_i, d]`, with their
    `[n_images, 3]` grids or None), the text in chunks between them."""
    fed = 0
    i = 0
    while i < prompt.n_images:
        point = prompt.points[i]
        j = i
        while j < prompt.n_images and prompt.points[j] == point:  # images sharing an insertion point
            j += 1
        if point > fed:
            session.forward_text(prompt.ids[fed:point])
            fed = point
        session.add_image_embeds(embeds[i:j], grids=None if grids is None else grids[i:j])
        i = j
    if fed < len(prompt.ids):
        session.forward_text(prompt.ids[fed:])


@torch.no_grad()
def greedy_decode_uncached(model, prompts: list[Encoded], processor: Processor, *, max_new_tokens: int = 24,
                  backend: str = "auto") -> list[list[int]]:
    """Greedy continuation of each prompt, by one full uncached forward over
    all rows per new token (the plain path; see the module docstring).

    Args:
        model: a `CasaModel` (its mode is left as it is; call `.eval()` first).
        prompts: encoded prompts with their pixels (`Processor.encode` / `Encoded.prefix`).
        max_new_tokens: the most tokens generated per prompt.
    Returns:
        per prompt, the generated token ids, stop token excluded.
    """
    device = next(model.parameters()).device
    batch = stack_rows(prompts, processor.tok.pad_id, extra=max_new_tokens).to(device)
    embeds = model.encode_images(batch) if batch.images is not None else None
    batch = replace(batch, images=None, image_embeds=embeds, loss_mask=None)
    ids, T = batch.input_ids, batch.input_ids.shape[1]
    lengths = [len(p.ids) for p in prompts]
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        # each row: its prompt and answer so far, then padding as a document of its own
        doc_lens = [[n] + ([T - n] if T > n else []) for n in lengths]
        logits = model(replace(batch, input_ids=ids, doc_lens=doc_lens), backend=backend)
        nxt = logits[torch.arange(len(prompts)), torch.tensor(lengths) - 1].argmax(-1).tolist()
        for b, tok in enumerate(nxt):
            if done[b]:
                continue
            if tok in processor.stop_ids or lengths[b] >= T:
                done[b] = True
                continue
            out[b].append(tok)
            ids[b, lengths[b]] = tok
            lengths[b] += 1
        if all(done):
            break
    return out
