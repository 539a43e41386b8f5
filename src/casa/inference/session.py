"""Incremental inference for one stream: images and text arrive over time.

`Session` holds the inference state of docs/design.md §5 and feeds a `CasaModel`
through its blocks' public step API (`Block.step`, `Block.fusion_image_kv`,
`Block.update_image_tokens`):

- `add_images(...)` inserts images before the next text token. Whether they
  open a new window is `core.layout.StreamWindows`' decision (the batch rule,
  incrementally: consecutive images share a window). Each fusion layer
  computes the images' K/V once, here, and keeps them as its window's prefix
  (for `ca_ffn` from the image tokens as updated by the FFNs of the blocks
  below, as in the uncached forward). `insertion` instead runs the image
  tokens through the blocks as part of the stream: they take positions and
  enter the SA cache.
- `forward_text(ids)` runs any number of new text tokens (prefill or decode)
  and returns their logits. The SA cache holds text only (all variants but
  `insertion`); `casa` fusion layers add the text to their window state.

Design decisions:
- Positions count text tokens only (image keys take the position of the next
  text token, their insertion point), except in `insertion`, as in the
  uncached forward. An M-RoPE model (Qwen2.5-VL) gets the 3-component
  positions of `core/positions.py`: the session keeps the running 1-D
  position, from which each image's grid positions start.
- One stream per session (batch size 1): a stream's state is its caches, and
  batching streams would pad them to the longest.
- With `history=History(sink, window)` every cache keeps an attention sink
  plus a sliding window (`cache.py`); for `insertion` the window counts image
  tokens too.
- With `cache_dtype=torch.int8` every cache stores int8 keys/values with a
  scale per row and head (`cache.quantize`): a quarter of fp32's bytes (half
  of bf16's). Where casa's CPU kernels decode (one thread), the per-token
  cost that grows with the stream, reading the text cache, shrinks with
  them; other paths read dequantized copies and are slower than with a
  plain cache. Logits differ from the uncached forward by the rounding
  (tested within a stated tolerance).
- A session owns everything a decode step writes: its caches, its rotary
  tables and its one-call block plan (`core.decode.BlockSteps`, whose
  pointers change every token). Sessions over one model share only what is
  read-only once built (the weights, their packed copies and the plans'
  weight half), so sessions on
  different threads decode side by side, each giving the tokens it gives
  alone (tests/test_concurrency.py).
- The decode path (`decode="auto" | "kernels" | "torch"`) and the attention
  backend are resolved once, here, and kept (`decode` says which was taken).
- Several sessions on the kernel path advance one token each in one step
  (`Session.forward_tokens`: the weights read once for all of them, each
  session's logits bit for bit its own); with a `batcher`
  (`inference.batching.DecodeBatcher`), `forward_text` of one token takes
  such a step beside whichever sessions are waiting.
- Frame memory (`FusionConfig.frame_memory = k`): `add_images` pools each
  image to k tokens (`core.model.memory_tokens`) and keeps them pending; the
  next `forward_text` (or `forward_tokens`) runs them through the blocks
  first, as text of the window they open, so they take positions and enter
  the SA cache as the uncached forward has them. Pending, not run at once,
  because images added by several calls before the next text token share one
  window and put their memory tokens after all of them, as in the batch.
  `text_tokens` does not count them (`memory_tokens` does).
- The invariant, tested for every variant and placement: any split of a
  document into `add_images` and `forward_text` calls gives the logits of one
  uncached `CasaModel.forward`.
"""

from __future__ import annotations

import torch

from casa.core.attention import resolve_backend
from casa.core.decode import PACKED_MAX_ROWS, BlockSteps, block_steps, decoding, logits, resolve_decode
from casa.core.layout import History, StreamWindows
from casa.core.model import CasaModel, memory_tokens
from casa.core.positions import grid_positions
from casa.inference.cache import KVCache
from casa.vision.dynamic import preprocess_dynamic
from casa.vision.preprocess import check_pixels, preprocess

__all__ = ["CACHE_DTYPES", "Session", "cache_dtype_named"]

CACHE_DTYPES = {"model": None, "int8": torch.int8}  # `--cache-dtype` names -> `Session(cache_dtype=...)`


def cache_dtype_named(name: str) -> torch.dtype | None:
    """The `Session` cache dtype a `--cache-dtype` name stands for ("model": None, "int8")."""
    if name not in CACHE_DTYPES:
        raise ValueError(f"--cache-dtype {name!r}: choose from {list(CACHE_DTYPES)}")
    return CACHE_DTYPES[name]


class Session:
    """The inference state of one stream over a `CasaModel` (see the module docstring).

    Args:
        model: the model (its parameters' device and dtype are used throughout).
        history: bounded history for every cache, or None to keep everything.
        backend: attention backend name, validated once as in the forward (incremental attention
            is the same on every backend: `core.attention.cached_attend`).
        cache_dtype: None (the model's dtype) or `torch.int8` (quantized keys/values).
        decode: "auto", "kernels" or "torch" (`core.decode.resolve_decode`); `self.decode` is
            the path taken, "kernels" or "torch".
        batcher: a `batching.DecodeBatcher` over the same model: the session's one-token steps
            (kernel path) are then taken beside other sessions' (`forward_tokens`), with the same
            logits; None: alone.
    """

    def __init__(self, model: CasaModel, *, history: History | None = None, backend: str = "auto",
                 cache_dtype: torch.dtype | None = None, decode: str = "auto", batcher=None):
        if cache_dtype not in CACHE_DTYPES.values():
            raise ValueError(f"Session: cache_dtype {cache_dtype}: use None (the model's dtype) or torch.int8")
        self.model = model
        self.config = model.config
        self.history = history
        resolve_backend(backend, model.embed.weight.device)
        self.backend = backend
        self.decode = resolve_decode(decode, model.embed.weight)
        self._block_steps: BlockSteps | None = None  # this session's one-call block plan (kernel path)
        if batcher is not None and (batcher.model is not model or self.decode != "kernels"):
            raise ValueError("Session: a batcher decodes sessions over its own model on the kernel path "
                             f"(this session: decode {self.decode!r}); give none")
        self.batcher = batcher
        self.insertion = model.config.fusion.variant == "insertion"
        quantized = cache_dtype == torch.int8
        self.sa = [KVCache(history=history, quantized=quantized) for _ in model.blocks]
        self.windows = [KVCache(history=history, quantized=quantized) if b.fusion is not None else None
                        for b in model.blocks]
        self.stream = StreamWindows()  # where windows start, as the batch layout would say
        self.position = 0  # RoPE position of the next token
        self.images = 0  # images fed so far
        self.memory = model.config.fusion.frame_memory  # pooled tokens per image kept in the stream
        self.memory_tokens = 0  # memory tokens run so far
        self._pending: list[torch.Tensor] = []  # `[k * n, d]` memory tokens of images added since the last text
        self.last_logits: torch.Tensor | None = None  # [vocab], logits of the last text token fed

    @property
    def text_tokens(self) -> int:
        """Text tokens fed so far (frame-memory tokens not counted)."""
        return self.stream.text_tokens - self.memory_tokens

    # ------------------------------------------------------------- helpers
    @property
    def _param(self) -> torch.Tensor:
        return self.model.embed.weight

    def _run_blocks(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """New states `[1, t, d]` through every block: text at the next `t` positions, or
        (M-RoPE image tokens of `insertion`) at the given `[t, 3]` positions, which the caller accounts for."""
        t = h.shape[1]
        if positions is None:
            rotary = self.model.text_rotary(torch.arange(self.position, self.position + t, device=h.device)[None])
            self.position += t
        else:
            rotary = self.model.rotary(positions[None])
        with decoding(self.decode):  # packed weight layouts for the few-token projections (core/decode.py)
            steps = block_steps(self.model, h, self._block_steps) if positions is None else None
            if steps is not None:  # one token on the kernel path: one call per block
                self._block_steps = steps
                return steps(h, rotary, self.sa, self.windows)
            for block, sa, window in zip(self.model.blocks, self.sa, self.windows):
                h = block.step(h, rotary=rotary, sa_cache=sa, window=window)
        return h

    def _image_positions(self, grids: torch.Tensor, time_steps: torch.Tensor, device) -> torch.Tensor:
        """M-RoPE positions `[N_tok, 3]` of images inserted now (core/positions.py); for `insertion`
        they take positions in the stream, so the next text position moves past them."""
        parts = []
        for g, step in zip(grids.tolist(), time_steps.tolist()):
            parts.append(grid_positions(self.position, g, interval=step, pin_time=not self.insertion))
            if self.insertion:
                self.position += max(g[1], g[2])
        return torch.cat(parts).to(device)

    # -------------------------------------------------------------- images
    @torch.inference_mode()
    def add_images(self, images, *, time_steps: torch.Tensor | None = None) -> None:
        """Insert images before the next text token.

        Args:
            images: PIL images, uint8 `HxWx3` arrays or paths (preprocessed with
                the model's vision config), or float pixels `[N, C, S, S]`; with
                dynamic resolution also videos (lists of frames) and float items
                `[C, H, W]` / `[F, C, H, W]`.
            time_steps: `[N]` float M-RoPE temporal step per item (videos; default 1).
        """
        vc = self.config.vision
        if vc.dynamic and not torch.is_tensor(images):
            items = images if isinstance(images, (list, tuple)) and all(torch.is_tensor(x) for x in images) \
                else preprocess_dynamic(list(images) if isinstance(images, (list, tuple)) else [images], vc)
            items = [x.to(self._param.device, self._param.dtype) for x in items]
            grids = self.model.image_grids(items, None) if self.model.mrope else None
            self._add_embeds(self.model.vision.encode_items(items), grids, time_steps)
            return
        if torch.is_tensor(images):
            if not vc.dynamic:
                check_pixels(images, vc, "Session.add_images")
            pixels = images
        else:
            pixels = preprocess(images, vc)
        pixels = pixels.to(self._param.device, self._param.dtype)
        embeds = self.model.vision(pixels)
        grids = self.model.image_grids(pixels, torch.full((len(embeds),), embeds.shape[1])) if self.model.mrope \
            else None
        self._add_embeds(embeds, grids, time_steps)

    def _add_embeds(self, embeds, grids, time_steps) -> None:
        # through the public method (a subclass may observe it); M-RoPE details only where there are some
        extra = {k: v for k, v in dict(grids=grids, time_steps=time_steps).items() if v is not None}
        self.add_image_embeds(embeds, **extra)

    @torch.inference_mode()
    def add_image_embeds(self, embeds, *, grids: torch.Tensor | None = None,
                         time_steps: torch.Tensor | None = None) -> None:
        """Insert precomputed LM-width image tokens before the next text token.

        Args:
            embeds: float `[N, n, d]` (or one image, `[n, d]`), or a list of `[n_i, d]` (images of
                their own sizes); cast to the model's dtype.
            grids: `[N, 3]` long `(gt, gh, gw)` per image, for an M-RoPE model (default: square grids).
            time_steps: `[N]` float M-RoPE temporal step of each (videos; default 1).
        """
        d = self.config.lm.d_model
        if isinstance(embeds, (list, tuple)):
            parts = list(embeds)
        else:
            if embeds.dim() == 2:
                embeds = embeds[None]
            n = None if self.config.vision.dynamic else self.model.tokens_per_image
            if embeds.dim() != 3 or (n is not None and embeds.shape[1] != n):
                raise ValueError(f"Session.add_image_embeds: got shape {tuple(embeds.shape)} "
                                 f"({embeds.dtype}), expected floats [N, {n or 'n'}, {d}]")
            parts = list(embeds)
        for x in parts:
            if x.dim() != 2 or x.shape[1] != d or not x.is_floating_point():
                raise ValueError(f"Session.add_image_embeds: got an image of shape {tuple(x.shape)} "
                                 f"({x.dtype}), expected floats [n, {d}]")
        if not parts:
            return
        counts = torch.tensor([len(x) for x in parts], dtype=torch.long)
        tokens = torch.cat(parts).to(self._param.device, self._param.dtype)  # flat, image-major, as the forward
        self.images += len(parts)
        if self.stream.add_images():  # a new window: the fusion state starts over
            for window in self.windows:
                if window is not None:
                    window.reset()
        positions = None
        if self.model.mrope:
            grids = grids if grids is not None else self.model.image_grids(None, counts)
            steps = time_steps if time_steps is not None else torch.ones(len(parts))
            positions = self._image_positions(grids.cpu(), steps.cpu(), tokens.device)
        if self.insertion:
            self._run_blocks(tokens[None], positions)  # 1-D: image tokens take the next positions
            return
        # every image token takes the position of its insertion point (the next text token's);
        # M-RoPE spreads its spatial components over the image's grid
        if positions is None:
            positions = torch.full((tokens.shape[0],), self.position, device=tokens.device)
        image_rotary = self.model.rotary(positions)
        if self.memory:  # pooled from the tokens as the tower gave them, as in the forward
            self._pending.append(memory_tokens(tokens, counts, self.memory))
        update = self.config.fusion.variant == "ca_ffn"
        for block, window in zip(self.model.blocks, self.windows):
            if window is not None:
                k, v = block.fusion_image_kv(tokens, image_rotary)
                window.add_prefix(k[None], v[None])
            if update:
                tokens = block.update_image_tokens(tokens)

    # ---------------------------------------------------------------- text
    @torch.inference_mode()
    def forward_text(self, ids) -> torch.Tensor:
        """Run `t >= 1` new text tokens.

        Args:
            ids: a list or 1-D tensor of token ids.
        Returns:
            `[t, vocab]` logits, the model's dtype.
        """
        ids = torch.as_tensor(ids, dtype=torch.long, device=self._param.device).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("Session.forward_text: no token ids")
        vocab = self.config.lm.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"Session.forward_text: token ids out of range [0, {vocab}): {ids.tolist()[:10]}")
        self._run_memory()
        if ids.numel() == 1 and self.batcher is not None:  # a decoded token: beside the other sessions'
            return self.batcher.feed(self, int(ids[0]))[None]
        return self._forward_alone(ids)

    def _run_memory(self) -> None:
        """Run the pending frame-memory tokens through the blocks: text of the window the last
        images opened, before the text token they precede (module docstring)."""
        if not self._pending:
            return
        h = torch.cat(self._pending)[None]  # [1, m, d]
        self._pending = []
        self._run_blocks(h)
        self.stream.add_text(h.shape[1])
        self.memory_tokens += h.shape[1]

    def _forward_alone(self, ids: torch.Tensor) -> torch.Tensor:
        h = self._run_blocks(self.model.embed(ids)[None])
        self.stream.add_text(ids.numel())
        with decoding(self.decode):
            out = logits(self.model, h)[0]
        self.last_logits = out[-1]
        return out

    @staticmethod
    @torch.inference_mode()
    def forward_tokens(sessions: list[Session], ids: list[int]) -> list[torch.Tensor]:
        """One new text token for each of several sessions over one model, in one step: each block
        reads its weights once for all of them (`core.decode.BlockSteps.rows`); each session's
        state advances as `forward_text([id])` advances it, with the same logits, bit for bit.

        Args:
            sessions: at most `PACKED_MAX_ROWS` distinct sessions on the kernel path over one model
                (any cache lengths, windows, history bounds and cache dtypes).
            ids: the next token id of each.
        Returns:
            `[vocab]` logits per session, the model's dtype.
        """
        model = sessions[0].model
        if len({id(s) for s in sessions}) != len(sessions) or any(
                s.model is not model or s.decode != "kernels" for s in sessions):
            raise ValueError("Session.forward_tokens: distinct sessions over one model, on the kernel path")
        if len(sessions) > PACKED_MAX_ROWS:  # beyond it the logits take another path: other bits than alone
            raise ValueError(f"Session.forward_tokens: {len(sessions)} sessions, at most {PACKED_MAX_ROWS} per step")
        vocab = model.config.lm.vocab_size
        if len(ids) != len(sessions) or any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"Session.forward_tokens: one id in [0, {vocab}) per session, got {ids}")
        for s in sessions:
            s._run_memory()  # images added since their last token: their memory first, alone
        device = model.embed.weight.device
        hs = [model.embed(torch.tensor([[i]], device=device)) for i in ids]  # [1, 1, d] each
        with decoding("kernels"):
            checked: dict = {}  # the sessions share their weights: checked once for all
            steps = [block_steps(model, h, s._block_steps, checked) for s, h in zip(sessions, hs)]
            if any(st is None for st in steps):  # rows the kernels do not take: each alone
                return [s._forward_alone(torch.tensor([i], device=device))[-1] for s, i in zip(sessions, ids)]
            rotaries = [model.text_rotary(torch.tensor([[s.position]], device=device)) for s in sessions]
            outs = BlockSteps.rows(steps, hs, rotaries, [s.sa for s in sessions], [s.windows for s in sessions])
            rows = logits(model, torch.cat(outs))[:, -1]  # [B, vocab]
        for s, st, row in zip(sessions, steps, rows):
            s._block_steps, s.position, s.last_logits = st, s.position + 1, row
            s.stream.add_text(1)
        return list(rows)

    # ---------------------------------------------------------- accounting
    def kv_tokens(self) -> int:
        """Tokens held per layer: the SA cache's plus the largest fusion window
        state (image tokens + window text); i.e. what one attention layer of
        each kind holds, as the paper counts its KV cache."""
        sa = max((c.tokens for c in self.sa), default=0)
        fusion = max((w.tokens for w in self.windows if w is not None), default=0)
        return sa + fusion

    def cache_bytes(self) -> int:
        """Bytes of all keys/values held, every layer."""
        return sum(c.nbytes for c in self.sa) + sum(w.nbytes for w in self.windows if w is not None)

    def allocated_bytes(self) -> int:
        """Bytes of the cache buffers, spare capacity included."""
        return sum(c.allocated_bytes for c in self.sa) + sum(w.allocated_bytes for w in self.windows if w is not None)
