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
on the `[out, in]` layout it streams at the core's bandwidth.

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

__all__ = ["PACKED_MAX_ROWS", "decoding", "kernel_row", "packed_linear", "packed_swiglu", "transposed_layout",
           "use_packed"]

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
    if hit is not None and hit.transposed == (hit.weight.dtype == torch.float32 and not _kernel_rows()) \
            and _fresh(hit.sources):
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
