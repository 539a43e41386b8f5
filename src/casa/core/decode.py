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
  the layout it was built for. Inside one `decoding()` block (one decode
  step) a copy is checked once: weights do not change within a step.
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
import itertools
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from casa.core import cpu_kernels

__all__ = ["PACKED_MAX_ROWS", "decoding", "kernel_row", "packed_linear", "transposed_layout", "use_packed"]

PACKED_MAX_ROWS = 64  # rows (tokens x streams) up to which the packed layout is used
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_EPOCHS = itertools.count(1)


class _Step(NamedTuple):
    """What one `decoding()` block decided on entry: no weight changes and no thread-count changes
    happen inside a decode step, so neither is checked again per projection."""

    epoch: int  # packed copies validated in this block are not re-stamped in it
    kernels: bool  # casa's CPU kernels take one-row work (one thread, built)


_DECODING: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("casa_decoding", default=None)


@contextlib.contextmanager
def decoding():
    """Projections inside take the packed layouts (for the few rows `use_packed` allows)."""
    kernels = torch.get_num_threads() == 1 and cpu_kernels.available()
    token = _DECODING.set(_Step(next(_EPOCHS), kernels))
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
    casa's CPU kernels take: inside `decoding()`, one CPU thread, fp32/bf16, no autograd, built."""
    return (x.shape[:-width_dims].numel() == 1 and x.dtype in _KERNEL_DTYPES and x.device.type == "cpu"
            and _kernel_rows())


def transposed_layout(dtype: torch.dtype) -> bool:
    """Whether packed weights of `dtype` are stored `[in, out]` (fp32 without casa's kernel at one
    thread) rather than `[out, in]`."""
    return dtype == torch.float32 and not _kernel_rows()


def _kernel_rows() -> bool:
    """Whether one-row work goes through casa's kernels (inside `decoding()`, one thread, built, no autograd)."""
    step = _DECODING.get()
    return step is not None and step.kernels and not torch.is_grad_enabled()


def _stamp(linears, transposed: bool) -> tuple:
    # storage pointer and version of each weight and bias: a new dtype or device is a new storage
    return (transposed, *((m.weight.data_ptr(), m.weight._version) for m in linears),
            *((m.bias.data_ptr(), m.bias._version) for m in linears if m.bias is not None))


def _packed(owner: nn.Module, name: str, linears: tuple[nn.Linear, ...]):
    """`(weight, bias [sum(out)] or None, transposed)` for `linears`, cached on `owner` under `name`;
    weight `[in, sum(out)]` if `transposed` (`transposed_layout`), else `[sum(out), in]`."""
    cache = owner.__dict__.setdefault("_packed_for_decode", {})
    step = _DECODING.get()
    hit = cache.get(name)
    if hit is not None and step is not None and hit[3] == step.epoch:  # validated earlier in this step
        return hit[1], hit[2], hit[0][0]
    transposed = transposed_layout(linears[0].weight.dtype)
    stamp = _stamp(linears, transposed)
    epoch = step.epoch if step is not None else 0
    if hit is not None and hit[0] == stamp:
        cache[name] = (*hit[:3], epoch)
        return hit[1], hit[2], transposed
    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears])
        if transposed:
            weight = weight.t().contiguous()
        bias = None
        if any(m.bias is not None for m in linears):
            bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                              for m in linears])
    cache[name] = (stamp, weight, bias, epoch)
    return weight, bias, transposed


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
        if x.shape[:-1].numel() == 1 and weight.dtype in _KERNEL_DTYPES and x.device.type == "cpu" \
                and _kernel_rows():
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
