"""Greedy decoding of evaluation prompts, batched, for every fusion variant.

Used by `casa eval` (synthetic tasks and JSONL), the trainer's periodic
evaluation, the study, the standard benchmarks and the lmms-eval plugin.

Design decisions:
- Batched and uncached: prompts are right-padded rows (the padding is a
  document of its own, so no real token attends to it), images are encoded
  once, and each step runs one forward over all rows and appends the argmax
  at each row's end. Simple and exact for every variant; the cached path of
  `casa.inference` serves streaming, where the cache pays off.
- A row stops at its first stop token (`Processor.stop_ids`), which is not
  part of the answer, or after `max_new_tokens`.
- Uncached decoding costs `O(T^2)` per step, so a prompt longer than the
  model's budget is refused before any forward (`check_lengths`), with a
  message naming the sample, instead of running for minutes and exhausting
  memory.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from casa.data import Encoded, Processor, stack_rows
from casa.data.packing import sequence_tokens
from casa.data.sample import DataError

__all__ = ["PromptTooLong", "check_lengths", "greedy_decode"]


class PromptTooLong(DataError):
    """An evaluation prompt (plus its answer budget) longer than the model's token limit."""


def check_lengths(prompts: list[Encoded], processor: Processor, *, max_new_tokens: int, limit: int,
                  splice_images: bool, limit_source: str = "the token limit") -> None:
    """Refuse any prompt whose decoding would exceed `limit` sequence positions.

    Args:
        prompts: encoded prompts (`Encoded.ids` are the prompt's token ids).
        max_new_tokens: the answer budget each prompt decodes into.
        limit: the most sequence positions a row may reach.
        splice_images: the `insertion` variant: image tokens sit in the sequence too.
        limit_source: where `limit` comes from, for the message.
    Raises:
        PromptTooLong: naming the first offending prompt's source and both lengths.
    """
    for p in prompts:
        need = sequence_tokens(p, processor.tokens_per_image, splice_images=splice_images) + max_new_tokens
        if need > limit:
            raise PromptTooLong(
                f"{p.source}: the prompt needs {need:,} tokens ({len(p.ids):,} prompt tokens"
                + (f", {p.n_images * processor.tokens_per_image:,} image tokens" if splice_images else "")
                + f", {max_new_tokens} answer tokens), over the model's limit of {limit:,} ({limit_source}); "
                "shorten the sample or raise the limit with --max-tokens")


@torch.no_grad()
def greedy_decode(model, prompts: list[Encoded], processor: Processor, *, max_new_tokens: int = 24,
                  backend: str = "auto") -> list[list[int]]:
    """Greedy continuation of each prompt.

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
