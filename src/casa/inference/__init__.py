"""Inference over one stream: KV caches, the session, generation and chat,
and streaming captioning (frame sources, the captioner, SRT/JSONL writers).

Design decisions:
- The session (`session.py`) owns the inference state and talks to the model
  through `Block`'s public step API; the window and mask rules come from
  `core/layout.py`, never restated here.
- Chat renders turns with the model's `data.Processor`, the same rendering as
  training and evaluation.
- `sources.py` and `writers.py` do not import torch, so the command can
  refuse bad paths and videos before the model stack is even loaded.
"""

__all__: list[str] = []
