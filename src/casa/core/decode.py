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
on the `[out, in]` layout it streams at the core's bandwidth, and a whole
attention sublayer or feed-forward of one token is one kernel call
(`attention_row`, `mlp_row`).

Design decisions:
- The state dict does not change: the packed copies (`[in, sum(out)]` in
  fp32, `[sum(out), in]` otherwise, `transposed_layout`) are
  built lazily from the `nn.Linear` modules on first use and kept beside
  them (not registered as parameters or buffers), so HF names, checkpoints
  and training are untouched.
- A packed copy is rebuilt when any of its source parameters changed: it
  records each parameter's storage pointer and version counter (bumped by
  every in-place update: optimizer steps, `load_state_dict`, `.to()`), and
  the layout it was built for.
- Used only inside `decoding()` (entered by the incremental paths,
  `inference.Session` and `inference.rows.RowDecoder`), without autograd
  and for few rows (`use_packed`): training and the full forward keep
  `F.linear`, so the uncached forward stays the plain reference that the
  cached paths are tested against. The extra memory is one copy of the decoder's projection
  weights, paid only by processes that decode.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from casa.core import cpu_kernels

__all__ = ["PACKED_MAX_ROWS", "attention_row", "decoding", "kernel_row", "mlp_row", "packed_linear", "packed_swiglu",
           "transposed_layout", "use_packed"]

PACKED_MAX_ROWS = 64  # rows (tokens x streams) up to which the packed layout is used
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_DECODING: contextvars.ContextVar[bool | None] = contextvars.ContextVar("casa_decoding", default=None)


@contextlib.contextmanager
def decoding():
    """Projections inside take the packed layouts (for the few rows `use_packed` allows); whether
    casa's CPU kernels take one-row work (one thread, built) is decided here, once per step."""
    token = _DECODING.set(torch.get_num_threads() == 1 and cpu_kernels.available())
    try:
        yield
    finally:
        _DECODING.reset(token)


def use_packed(x: torch.Tensor) -> bool:
    """Whether a projection of `x: [..., in]` takes the packed path: inside `decoding()`,
    no autograd, at most `PACKED_MAX_ROWS` rows."""
    return _DECODING.get() is not None and not torch.is_grad_enabled() and x.shape[:-1].numel() <= PACKED_MAX_ROWS


def kernel_row(x: torch.Tensor, *, width_dims: int = 1) -> bool:
    """Whether `x` is one decoded row (its dims before the last `width_dims` hold one element) that
    casa's CPU kernels take: inside `decoding()`, one CPU thread, fp32/bf16, no autograd, built.
    (Called ~70 times per decoded token: the cheapest tests first.)"""
    if not _DECODING.get() or torch.is_grad_enabled() or x.dtype not in _KERNEL_DTYPES or not x.is_cpu:
        return False
    return x.numel() == x.shape[-1] if width_dims == 1 else x.shape[:-width_dims].numel() == 1


def transposed_layout(dtype: torch.dtype) -> bool:
    """Whether packed weights of `dtype` are stored `[in, out]` (fp32 without casa's kernel at one
    thread) rather than `[out, in]`."""
    return dtype == torch.float32 and not _kernel_rows()


def _kernel_rows() -> bool:
    """Whether one-row work goes through casa's kernels (inside `decoding()`, one thread, built, no autograd)."""
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
    cache = owner.__dict__.setdefault("_packed_for_decode", {})
    hit = cache.get(name)
    if hit is not None and hit.transposed == transposed_layout(hit.weight.dtype) and _fresh(hit.sources):
        return hit.weight, hit.bias, hit.transposed
    transposed = transposed_layout(linears[0].weight.dtype)
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
    cache[name] = _Packed(weight, bias, transposed, sources)
    return weight, bias, transposed


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


def attention_row(h: torch.Tensor, attn: nn.Module, norm: nn.Module, rope, cache) -> torch.Tensor | None:
    """One decoded token through an attention sublayer whose key/value join `cache`, in one
    kernel call (`cpu_kernels.attn_step`: norm, fused q/k/v product, RoPE, cache write, attention,
    output product), or None where that kernel does not apply (the caller takes the per-op path).

    Args:
        h: `[1, 1, d]` states before `norm` (an RMSNorm).
        attn: a `core.lm.Attention` (its packed q/k/v and o weights are used).
        rope: `(cos, signed_sin)` tables of `h`'s dtype with `head_dim` elements each, or None.
        cache: a `KVCache`-like object with `next_row` / `commit_row` (others: None is returned).
    Returns:
        `[1, 1, d]` in `h`'s dtype, or None.
    """
    if not kernel_row(h) or not h.is_contiguous() or not hasattr(cache, "next_row"):
        return None
    if norm.weight.dtype != h.dtype or (cache.k is not None and cache.k.dtype != h.dtype) \
            or attn.head_dim > cpu_kernels.MAX_HEAD_DIM or attn.n_heads % attn.n_kv_heads:
        return None
    qkv, bias, transposed = _packed(attn, "qkv", (attn.q_proj, attn.k_proj, attn.v_proj))
    o, _, _ = _packed(attn, "o", (attn.o_proj,))
    if transposed or qkv.dtype != h.dtype:
        return None
    row, held = cache.next_row(h, heads=attn.n_kv_heads, width=attn.head_dim)
    y = cpu_kernels.attn_step(h, norm.weight, norm.eps, qkv, None if bias is None else bias.float(), o, rope,
                              cache.k, cache.v, row=row, held=held, heads=attn.n_heads)
    cache.commit_row()
    return (y if y.dtype == h.dtype else y.to(h.dtype)).view(h.shape)


def mlp_row(h: torch.Tensor, mlp: nn.Module, norm: nn.Module) -> torch.Tensor | None:
    """`mlp(norm(h))` of one decoded token in one kernel call (`cpu_kernels.mlp_step`), or None
    where it does not apply.

    Args:
        h: `[1, 1, d]`; `mlp` a `core.lm.MLP`, `norm` an RMSNorm.
    Returns:
        `[1, 1, d]` in `h`'s dtype, or None.
    """
    if not kernel_row(h) or not h.is_contiguous() or norm.weight.dtype != h.dtype:
        return None
    gate_up, _, transposed = _packed(mlp, "gate_up", (mlp.gate_proj, mlp.up_proj))
    down, _, _ = _packed(mlp, "down", (mlp.down_proj,))
    if transposed or gate_up.dtype != h.dtype:
        return None
    y = cpu_kernels.mlp_step(h, norm.weight, norm.eps, gate_up, down)
    return (y if y.dtype == h.dtype else y.to(h.dtype)).view(h.shape)
