"""Weight layouts for decoding: projections of a few tokens at memory bandwidth.

A decode step multiplies one token (or one per batched stream) by every
weight matrix of the model, so its time is the time to stream the weights.
In fp32 on CPU, `F.linear` on PyTorch's `[out, in]` layout reads them well
below the bandwidth one thread can stream; the same product on a
pre-transposed `[in, out]` matrix reads them markedly faster. In bf16 the
opposite holds (the transposed product falls off oneDNN's fast path and is
several times slower), so bf16 keeps `[out, in]`. Either way, fusing the
projections that read the same input (q/k/v, gate/up) cuts the calls and
their per-op overhead. At one thread, where casa's own kernel is built
(`core.cpu_kernels`), one-row products go through it instead, in every dtype,
on the `[out, in]` layout it streams at the core's bandwidth, and a decoded
token's whole block is one kernel call (`BlockSteps`, a plan of pointers,
rebuilt when a weight changes), for one stream or several at once.

This module is the one home of the CPU decode path: which path a stream
decodes on (`resolve_decode`, decided once per stream and reported), the
packed layouts, and every call into casa's kernels for one decoded row. The
building blocks of `core/lm.py` and `core/model.py` stay plain PyTorch: the
reference the kernel path is tested against.

Design decisions:
- The decode path is a named option, `decode="auto" | "kernels" | "torch"`,
  resolved once when a stream starts (`resolve_decode`): "auto" takes the
  kernels where they are built, the weights are fp32/bf16 on CPU and torch
  runs one thread (the kernels' own threads are a separate, explicit
  setting, `cpu_kernels.set_threads`; with more torch threads, PyTorch's
  products use them). A step reads the resolved choice from a
  context variable (`decoding(path)`), so streams decoding on other threads
  never see each other's choice.
- Decoding state belongs to the stream. What a step writes (a `BlockSteps`
  plan's cache pointers and row numbers, rotary tables, caches) is owned by
  the stream that decodes (`inference.Session` keeps its `BlockSteps`);
  what is shared between streams over one model is read-only once built:
  the packed weights (kept per layout) and the weight half of the block
  plans (`_BlockWeights`), built once under a lock. The kernels release the GIL, so a plan shared between two
  threads would be rewritten by one while the other's kernel reads it (one
  stream's keys written into another's cache): tests/test_concurrency.py
  decodes streams on several threads at once against their solo runs.
- The state dict does not change: the packed copies (`[in, sum(out)]` in
  fp32, `[sum(out), in]` otherwise, `transposed_layout`) are
  built lazily from the `nn.Linear` modules on first use and kept beside
  them (not registered as parameters or buffers), so HF names, checkpoints
  and training are untouched.
- A packed copy is rebuilt when any of its source parameters changed: it
  records each parameter's storage pointer and version counter (bumped by
  every in-place update: optimizer steps, `load_state_dict`, `.to()`), and
  the layout it was built for.
- Used only inside `decoding(path)` (entered by the incremental paths,
  `inference.Session` and `inference.rows.RowDecoder`), without autograd
  and for few rows (`use_packed`): training and the full forward keep
  `F.linear`, so the uncached forward stays the plain reference that the
  cached paths are tested against. The extra memory is one copy of the decoder's projection
  weights, paid only by processes that decode.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from casa.core import cpu_kernels
from casa.core.caches import RowWriter, StepCache

__all__ = ["DECODE_PATHS", "PACKED_MAX_ROWS", "BlockSteps", "block_steps", "decoding", "kernel_row", "kernels_on",
           "logits", "packed_linear", "packed_swiglu", "resolve_decode", "transposed_layout", "use_packed"]

DECODE_PATHS = ("auto", "kernels", "torch")  # the `decode=` option of a stream (`resolve_decode`)
PACKED_MAX_ROWS = 64  # rows (tokens x streams) up to which the packed layout is used
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# inside `decoding(path)`: True on the kernel path, False on the torch path; None outside
_DECODING: contextvars.ContextVar[bool | None] = contextvars.ContextVar("casa_decoding", default=None)
_PACKING = threading.RLock()  # shared weights are built once, whichever stream asks first (re-entered: plans pack)


def _kernels_refused(weight: torch.Tensor) -> str | None:
    """Why casa's kernels cannot decode a model whose weights are like `weight`, or None."""
    if not weight.is_cpu:
        return f"the model is on {weight.device} (the kernels run on CPU)"
    if weight.dtype not in _KERNEL_DTYPES:
        return f"the model's dtype is {weight.dtype} (the kernels take float32 and bfloat16)"
    if not cpu_kernels.available():
        return "casa's CPU kernels are not built on this machine (they need a C compiler: cc)"
    return None


def resolve_decode(path: str, weight: torch.Tensor) -> str:
    """The decode path of a stream over a model whose weights are like `weight`, decided once.

    Args:
        path: "auto" (the kernels where they apply and torch runs one thread, else torch),
            "kernels" (an error where they cannot), or "torch" (PyTorch ops only: the reference).
    Returns:
        "kernels" or "torch".
    """
    if path not in DECODE_PATHS:
        raise ValueError(f"decode={path!r}: choose from {list(DECODE_PATHS)}")
    if path == "torch":
        return path
    refused = _kernels_refused(weight)
    if path == "kernels":
        if refused:
            raise ValueError(f"decode='kernels': {refused}; use decode='auto' or 'torch'")
        return path
    # the kernels are single-threaded: with more torch threads, PyTorch's products use them
    return "kernels" if refused is None and torch.get_num_threads() == 1 else "torch"


@contextlib.contextmanager
def decoding(path: str):
    """A decode step on `path` ("kernels" or "torch", from `resolve_decode`): projections
    inside take the packed layouts (for the few rows `use_packed` allows), and one-row work
    takes casa's kernels on the kernel path."""
    if path not in ("kernels", "torch"):
        raise ValueError(f"decoding({path!r}): a resolved path, 'kernels' or 'torch' (resolve_decode)")
    token = _DECODING.set(path == "kernels")
    try:
        yield
    finally:
        _DECODING.reset(token)


def kernels_on() -> bool:
    """Whether this step decodes on the kernel path (inside `decoding("kernels")`)."""
    return bool(_DECODING.get())


def use_packed(x: torch.Tensor) -> bool:
    """Whether a projection of `x: [..., in]` takes the packed path: inside `decoding(path)`,
    no autograd, at most `PACKED_MAX_ROWS` rows."""
    return _DECODING.get() is not None and not torch.is_grad_enabled() and x.shape[:-1].numel() <= PACKED_MAX_ROWS


def kernel_row(x: torch.Tensor, *, width_dims: int = 1) -> bool:
    """Whether `x` is one decoded row (its dims before the last `width_dims` hold one element) that
    casa's CPU kernels take: inside `decoding("kernels")`, CPU, fp32/bf16, no autograd.
    (Called ~70 times per decoded token: the cheapest tests first.)"""
    if not _DECODING.get() or torch.is_grad_enabled() or x.dtype not in _KERNEL_DTYPES or not x.is_cpu:
        return False
    return x.numel() == x.shape[-1] if width_dims == 1 else x.shape[:-width_dims].numel() == 1


def transposed_layout(dtype: torch.dtype) -> bool:
    """Whether packed weights of `dtype` are stored `[in, out]` (fp32 off the kernel path) rather
    than `[out, in]`."""
    return dtype == torch.float32 and not _kernel_rows()


def _kernel_rows() -> bool:
    """Whether one-row work goes through casa's kernels (the kernel path, no autograd)."""
    return bool(_DECODING.get()) and not torch.is_grad_enabled()


class _Packed(NamedTuple):
    weight: torch.Tensor
    bias: torch.Tensor | None
    transposed: bool
    # (the module's parameter dict, name, parameter, storage pointer, version) of each source:
    # checked without nn.Module's attribute lookup, which a decode step would pay ~100 times
    sources: tuple


def _fresh(sources: tuple) -> bool:
    """Whether every source parameter is still the same object, storage and version (a new
    dtype or device is a new storage; optimizer steps and `load_state_dict` bump the version)."""
    return all(params.get(name) is p and p._version == version and p.data_ptr() == ptr
               for params, name, p, ptr, version in sources)


def _packed(owner: nn.Module, name: str, linears: tuple[nn.Linear, ...]):
    """`(weight, bias [sum(out)] or None, transposed)` for `linears`, cached on `owner` under `name`;
    weight `[in, sum(out)]` if `transposed` (`transposed_layout`), else `[sum(out), in]`."""
    return _packed_entry(owner, name, linears)[:3]


def _packed_entry(owner: nn.Module, name: str, linears: tuple[nn.Linear, ...]) -> _Packed:
    """`_packed`'s cache entry, sources included: shared by every stream over the model, read-only
    once built, kept per layout (streams on the two paths do not rebuild each other's)."""
    transposed = transposed_layout(linears[0].weight.dtype)
    cache = owner.__dict__.setdefault("_packed_for_decode", {})
    hit = cache.get((name, transposed))
    if hit is not None and _fresh(hit.sources):
        return hit
    with _PACKING:  # another stream may be building it right now: build once, then share
        hit = cache.get((name, transposed))
        if hit is None or not _fresh(hit.sources):
            cache[name, transposed] = hit = _pack(linears, transposed)
    return hit


def _pack(linears: tuple[nn.Linear, ...], transposed: bool) -> _Packed:
    """A new packed copy of `linears` (see `_packed`)."""
    sources = tuple((m._parameters, key, p, p.data_ptr(), p._version)
                    for m in linears for key, p in m._parameters.items() if p is not None)
    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears])
        if transposed:
            weight = weight.t().contiguous()
        bias = None
        if any(m.bias is not None for m in linears):
            bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                              for m in linears])
    return _Packed(weight, bias, transposed, sources)


def packed_swiglu(x: torch.Tensor, owner: nn.Module, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    """`down(silu(gate(x)) * up(x))` through the packed layouts: one kernel call for one row at one
    thread (`cpu_kernels.swiglu`), else a gate/up product and a down product.

    Args:
        x: `[..., d]`; the linears have no bias.
    Returns:
        `[..., d_out]`.
    """
    if kernel_row(x):
        gate_up, _, transposed = _packed(owner, "gate_up", (gate, up))
        weight, _, _ = _packed(owner, "down", (down,))
        if not transposed and gate_up.dtype == x.dtype:
            y = cpu_kernels.swiglu(x, gate_up, weight)
            return (y if y.dtype == x.dtype else y.to(x.dtype)).view(*x.shape[:-1], -1)
    g, u = packed_linear(x, owner, "gate_up", (gate, up)).chunk(2, dim=-1)
    return packed_linear(F.silu(g) * u, owner, "down", (down,))


def packed_linear(x: torch.Tensor, owner: nn.Module, name: str, linears: tuple[nn.Linear, ...]) -> torch.Tensor:
    """`cat([m(x) for m in linears], -1)` through one packed matrix.

    Args:
        x: `[..., in]`, the linears' dtype.
        owner: the module the packed copy is cached on; `name` its key there.
        linears: `nn.Linear`s with the same input size.
    Returns:
        `[..., sum(out)]`.
    """
    weight, bias, transposed = _packed(owner, name, linears)
    if not transposed:
        if kernel_row(x) and weight.dtype == x.dtype:
            y = cpu_kernels.gemv(weight, x.reshape(-1), bias)
            return (y if y.dtype == x.dtype else y.to(x.dtype)).view(*x.shape[:-1], -1)
        return F.linear(x, weight, bias)
    if x.shape[:-1].numel() == 1:
        # one row: BLAS's matrix-vector product on the transposed view (measured on this
        # project's CPU: as fast as `x @ weight` on a quiet machine, 1.7x faster under load)
        out = torch.mv(weight.t(), x.reshape(-1)).view(*x.shape[:-1], -1)
    else:
        out = x @ weight
    return out if bias is None else out + bias


def _attention_weights(attn: nn.Module, norm: nn.Module, dtype: torch.dtype) -> tuple[_Packed, _Packed] | None:
    """The packed q/k/v and output entries of `attn` for the fused attention kernel in `dtype`,
    or None where that kernel does not take `attn` after `norm`."""
    if norm.weight.dtype != dtype or attn.head_dim > cpu_kernels.MAX_HEAD_DIM or attn.n_heads % attn.n_kv_heads:
        return None
    qkv = _packed_entry(attn, "qkv", (attn.q_proj, attn.k_proj, attn.v_proj))
    if qkv.transposed or qkv.weight.dtype != dtype:
        return None
    return qkv, _packed_entry(attn, "o", (attn.o_proj,))


def _mlp_weights(mlp: nn.Module, norm: nn.Module, dtype: torch.dtype) -> tuple[_Packed, _Packed] | None:
    """The packed gate/up and down entries of `mlp` for the fused feed-forward kernel in `dtype`,
    or None where that kernel does not take `mlp` after `norm`."""
    if norm.weight.dtype != dtype:
        return None
    gate_up = _packed_entry(mlp, "gate_up", (mlp.gate_proj, mlp.up_proj))
    if gate_up.transposed or gate_up.weight.dtype != dtype:
        return None
    return gate_up, _packed_entry(mlp, "down", (mlp.down_proj,))


def _cache_takes(cache: StepCache, dtype: torch.dtype) -> bool:
    """Whether a fused kernel can write a row of `dtype` into `cache` in place: a `RowWriter`
    (`core.caches`) holding entries of that dtype (stored as such, or as int8), or none yet."""
    # an attribute test, not isinstance against the Protocol: that walks its members, per token and layer
    return getattr(cache, "next_row", None) is not None and cache.dtype in (None, dtype)


_REPLACE = cpu_kernels.PLACEMENTS["replace"]


class _BlockWeights:
    """The weight half of a model's block plans, read-only once built and shared by every stream
    over the model (`_block_weights`): per block a `cpu_kernels.BlockPlan` with its weight
    pointers set and its cache fields empty, or None where `Block.step` has to run the block;
    what the plans point into (`sources`, as `_fresh` checks it; `keep`, held alive)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        self.sources: list = []
        self.keep: list = []
        self.plans = [self._block(block) for block in model.blocks]

    def _tensor(self, t: torch.Tensor) -> int:
        self.keep.append(t)
        return t.data_ptr()

    def _norm(self, norm: nn.Module) -> int:
        p = norm._parameters["weight"]
        self.sources.append((norm._parameters, "weight", p, p.data_ptr(), p._version))
        return self._tensor(p)

    def _weights(self, entries: tuple[_Packed, ...] | None) -> tuple[_Packed, ...] | None:
        """`entries` (packed weights), recorded as what the plans point into."""
        for entry in entries or ():
            self.sources.extend(entry.sources)
            self.keep.append(entry)
        return entries

    def _attention(self, plan, attn: nn.Module, norm: nn.Module, *, rope: bool) -> bool:
        """Fill `plan` (a `cpu_kernels.AttnPlan`) for `attn` after `norm`; False where the kernel does not apply."""
        weights = self._weights(_attention_weights(attn, norm, self.dtype))
        if weights is None:
            return False
        qkv, o = weights
        plan.norm_w, plan.eps = self._norm(norm), norm.eps
        plan.Wqkv, plan.Wo = qkv.weight.data_ptr(), o.weight.data_ptr()
        plan.b = None if qkv.bias is None else self._tensor(qkv.bias.float())
        plan.H, plan.Hkv, plan.D, plan.rope = attn.n_heads, attn.n_kv_heads, attn.head_dim, int(rope)
        return True

    def _block(self, block: nn.Module):
        """The block's `cpu_kernels.BlockPlan`, or None where `Block.step` has to run it."""
        plan, fusion = cpu_kernels.BlockPlan(), block.fusion
        if not self._attention(plan.sa, block.attn, block.input_layernorm, rope=True):
            return None
        if fusion is not None:
            if fusion.variant == "gated_ca" or not self._attention(
                    plan.fusion, fusion.attn if fusion.attn is not None else block.attn, block._fusion_norm(),
                    rope=fusion.positional):
                return None
            plan.fusion.row = 0 if fusion.text_keys else -1  # -1 for good: the token reads its window, never joins it
        norm = block.post_attention_layernorm
        weights = self._weights(_mlp_weights(block.mlp, norm, self.dtype))
        if weights is None:
            return None
        gate_up, down = weights
        plan.mlp_norm_w, plan.mlp_eps = self._norm(norm), norm.eps
        plan.Wgu, plan.Wd = gate_up.weight.data_ptr(), down.weight.data_ptr()
        plan.I, plan.F = down.weight.shape
        plan.placement = cpu_kernels.PLACEMENTS[None if fusion is None else block.placement]
        return plan


def _block_weights(model: nn.Module, dtype: torch.dtype) -> _BlockWeights:
    """`model`'s shared `_BlockWeights` for `dtype`, built once (under the packing lock) and
    rebuilt when a weight it points into changed."""
    shared = model.__dict__.setdefault("_block_weights", {})
    hit = shared.get(dtype)
    if hit is not None and _fresh(hit.sources):
        return hit
    with _PACKING:
        hit = shared.get(dtype)
        if hit is None or not _fresh(hit.sources):
            shared[dtype] = hit = _BlockWeights(model, dtype)
    return hit


class BlockSteps:
    """A model's decoder blocks, each one kernel call per decoded token (`cpu_kernels.block_rows`):
    the attention sublayers by placement, the residual adds and the feed-forward of `Block.step`
    (equal within float summation order: tests/test_cpu_kernels.py), without its ~20
    Python-level calls per block.

    Owned by one stream (`block_steps`): its plans, copies of the model's shared `_BlockWeights`,
    hold that stream's cache pointers and rows, rewritten for every token while the kernel runs
    without the GIL; rebuilt when a packed weight, or a norm's weight, changed. A fusion layer
    without text keys (the `ca` family) reads its window's image prefix without joining it
    (`AttnPlan.row` -1); a block whose fusion layer the kernel does not take (`gated_ca`'s gates
    and FFN) keeps `Block.step`.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model, self.dtype = model, dtype
        self.weights = _block_weights(model, dtype)
        self.plans = [None if p is None else cpu_kernels.BlockPlan.from_buffer_copy(p) for p in self.weights.plans]

    def fresh(self) -> bool:
        """Whether every weight the plans point into is unchanged (`_fresh`)."""
        return _fresh(self.weights.sources)

    @staticmethod
    def _point(plan, cache: RowWriter, row: int, held: int) -> None:
        """Set `plan`'s cache fields: attend rows `[0, held)` of `cache`, the token's key/value at `row`
        (-1: read only)."""
        plan.row, plan.held = row, held
        plan.kc, plan.vc, plan.hs = (0, 0, 0) if cache.k is None else \
            (cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape[2] * plan.D)
        plan.cache = cpu_kernels.CACHE_INT8 if cache.quantized else 0
        plan.ksc, plan.vsc, plan.ss = (0, 0, 0) if cache.k_scale is None else \
            (cache.k_scale.data_ptr(), cache.v_scale.data_ptr(), cache.k.shape[2])  # scales [1, Hkv, capacity]

    def _bound(self, plan, sa: StepCache, window: StepCache | None, like: torch.Tensor) -> list | None:
        """Bind `plan` to this token's caches: the SA's unless the fusion layer replaces it, the
        window's where there is a fusion layer, joined (text keys) or only read (its image prefix:
        row -1). Returns the caches the token joins, to commit after the call, or None where
        `Block.step` has to run the block."""
        if plan is None:
            return None
        joins = [] if plan.placement == _REPLACE else [(plan.sa, sa)]
        if plan.placement and plan.fusion.row >= 0:
            joins.append((plan.fusion, window))
        elif plan.placement:  # a fusion layer without text keys: the window must hold only its prefix
            if not _cache_takes(window, self.dtype) or window.n_slots:
                return None
            self._point(plan.fusion, window, -1, window.n_prefix)
        for sub, cache in joins:
            if not _cache_takes(cache, self.dtype):
                return None
            self._point(sub, cache, *cache.next_row(like, heads=sub.Hkv, width=sub.D))
        return joins

    @staticmethod
    def rows(steps: list[BlockSteps], hs: list[torch.Tensor], rotaries: list, sa_caches: list[list[StepCache]],
             windows: list[list[StepCache | None]]) -> list[torch.Tensor]:
        """One decoded token of each of several streams through every block: per block one kernel
        call for all of them (`cpu_kernels.block_rows`: the weights read once), each row with the
        bits it gets alone (`__call__` is this for one stream). A row whose block the kernel does not
        take runs `Block.step`.

        Args:
            steps: each stream's own `BlockSteps`, over the same model and dtype.
            hs: `[1, 1, d]` states per stream; `rotaries`: RoPE at each stream's position.
            sa_caches, windows: per stream, per block, as `__call__` takes them.
        Returns:
            `[1, 1, d]` per stream.
        """
        model, dtype = steps[0].model, steps[0].dtype
        if any(s.model is not model or s.dtype != dtype for s in steps):
            raise ValueError("BlockSteps.rows: the streams' plans must be over one model and dtype")
        ropes = [r.tables(dtype) for r in rotaries]
        xs = [h.reshape(-1).clone() for h in hs]  # overwritten block by block
        for i, block in enumerate(model.blocks):
            bound = [s._bound(s.plans[i], sa[i], win[i], x) for s, sa, win, x in zip(steps, sa_caches, windows, xs)]
            together = [b for b, joins in enumerate(bound) if joins is not None]
            if together:
                cpu_kernels.block_rows([steps[b].plans[i] for b in together], [xs[b] for b in together],
                                       [ropes[b] for b in together])
                for b in together:
                    for _, cache in bound[b]:
                        cache.commit_row()
            for b, joins in enumerate(bound):
                if joins is None:
                    xs[b] = block.step(xs[b].view(hs[b].shape), rotary=rotaries[b], sa_cache=sa_caches[b][i],
                                       window=windows[b][i]).reshape(-1)
        return [x.view(h.shape) for x, h in zip(xs, hs)]

    def __call__(self, h: torch.Tensor, rotary, sa_caches: list[StepCache],
                 windows: list[StepCache | None]) -> torch.Tensor:
        """`h` through every block, as `Block.step` for each (one decoded token of one stream).

        Args:
            h: `[1, 1, d]` states of `self.dtype`; `rotary`: RoPE at the token's position.
            sa_caches, windows: per block, its `KVCache` and fusion window (None without fusion).
        Returns:
            `[1, 1, d]`.
        """
        return self.rows([self], [h], [rotary], [sa_caches], [windows])[0]

def block_steps(model: nn.Module, h: torch.Tensor, previous: BlockSteps | None,
                checked: dict | None = None) -> BlockSteps | None:
    """The `BlockSteps` a stream decodes `h` (`[1, 1, d]`, one token) with: its `previous` one
    while that still fits (same dtype, weights unchanged), else a new one; None off the kernel
    path. The caller owns what it gets (see `BlockSteps`). `checked`: freshness already found
    this step, by shared weights (streams decoded together check their shared weights once)."""
    if not kernel_row(h) or not h.is_contiguous():
        return None
    if previous is not None and previous.model is model and previous.dtype == h.dtype:
        key = id(previous.weights)
        fresh = checked[key] if checked is not None and key in checked else previous.fresh()
        if checked is not None:
            checked[key] = fresh
        if fresh:
            return previous
    return BlockSteps(model, h.dtype)


def logits(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """`model.lm_head(model.norm(h))`; on the kernel path, up to `PACKED_MAX_ROWS` rows through
    the kernels (the norm, then `cpu_kernels.gemm_rows`), so that a stream's logits have the same
    bits whether its row was computed alone or beside other streams' (`BlockSteps.rows`).

    Args:
        h: `[..., d]` final hidden states, the model's dtype.
    Returns:
        `[..., vocab]`, `h`'s dtype.
    """
    norm, head = model.norm, model.lm_head
    if (kernels_on() and not torch.is_grad_enabled() and h.is_cpu and h.dtype in _KERNEL_DTYPES
            and h.shape[:-1].numel() <= PACKED_MAX_ROWS and h.shape[-1] <= cpu_kernels.MAX_NORM_WIDTH
            and norm.weight.dtype == h.dtype == head.weight.dtype and head.bias is None
            and head.weight.is_contiguous()):
        rows = cpu_kernels.rmsnorm(h.reshape(-1, h.shape[-1]).contiguous(), norm.weight, norm.eps)
        return cpu_kernels.gemm_rows(head.weight, rows).to(h.dtype).view(*h.shape[:-1], -1)
    return head(norm(h))
