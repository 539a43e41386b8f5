"""CPU decode kernels: one-row projections and few-query cache attention at streaming bandwidth.

A decoded token's time is the time to read the weights and the text cache
once. On the CPUs casa is measured on (AVX2, no AVX-512), BLAS reads a
one-row product's weights at about half the bandwidth one core can stream,
and SDPA reads a one-query cache at about a fifth of it. The kernels of
`cpu_kernels.c` (primitives) and `cpu_steps.c` (fused steps) read each
operand once, front to back, with fp32 sums:

- `gemm_rows(weight [O, I], x [B, I])` (`gemv` for one row): each weight
  row read once for the B rows, its chunks loaded once for up to three of
  them; every row's dot sums in one fixed order, so a row has the same bits
  alone or beside others.
- `attend(q [N, D], k/v [S, D])` for one key/value head: one pass over the
  keys for all `N` queries sharing the head (grouped heads x new tokens),
  a vectorized softmax, one pass over the values.
- `swiglu(x, gate_up, down)`: the feed-forward of one row in one call.
- `rmsnorm(x, weight)` and `rope(x, cos, signed_sin)`: one call each instead
  of eight and four small ops, with the same roundings (a decode step of an
  8-layer casa model normalizes 25 times and rotates 32 times; per-op
  overhead, not bytes, is what these cost).
- `block_rows`: decoded tokens through a whole decoder block (attention
  sublayers by placement, residual adds, feed-forward) in one call, from a
  `BlockPlan` of pointers per stream that its `core.decode.BlockSteps`
  keeps, so that a token costs one call per block; several streams' tokens
  go in one call (batched decoding), each row with the bits it gets alone.
- `attn_step` and `mlp_step`: a decoded token's whole attention sublayer
  (norm, fused q/k/v product, RoPE, cache write, attention, output product)
  and feed-forward (norm, SwiGLU) in one call each. Measured on the
  `bench stream` model (8 layers, d_model 512, fp32, one thread): 11.7 ->
  8.6 ms per token at turn 1; the dozen Python-level ops they replace cost
  more than the kernels' own reads. They round where the per-op kernels
  round, so both give the same bits (tested).

Design decisions:
- Built at first use, from `cpu_steps.c` (the fused steps, which includes
  `cpu_kernels.c`, the primitives), with the machine's C compiler (`cc -O3 -march=native`,
  about a second) into `~/.cache/casa/kernels/` (or `$CASA_KERNEL_DIR`),
  loaded through ctypes: no build step at install, no torch headers. Without
  a compiler, or with `CASA_CPU_KERNELS=0`, `available()` is False and the
  callers keep their PyTorch paths, which stay the reference the kernels are
  tested against (`tests/test_cpu_kernels.py`).
- Which decode path a stream takes is `core.decode.resolve_decode`'s
  decision ("auto": the kernels where torch runs one thread). The kernels'
  own threads (`set_threads`, OpenMP where the compiler has it; default 1)
  split output rows of the products and (row, head) pairs of the attention,
  never a sum, so every thread count gives the same bits. They wait for
  each other at every product: on a machine where another process holds a
  core, one thread is the faster setting.
- fp32 and bf16 operands (bf16 widened in registers), fp32 accumulation and
  fp32 results: callers cast back to their dtype, as PyTorch's bf16 kernels
  do after accumulating in fp32.
- An int8 cache (`inference.cache.quantize`: one fp32 scale per row and
  head) is read in place, its scales folded into the sums (a score is
  `scale_k * (q . k_int8)`, a value weight `p * scale_v`), and a decoded
  token's key/value are quantized where they are written, by the same rule.
  That reads a quarter of fp32's bytes; the passes' arithmetic, not the
  reads, then sets their speed: measured in one process on the `bench
  stream` model (one thread), 8000 more cached tokens cost a decoded token
  2.0-2.8 ms with an int8 cache against 3.0-4.8 ms with fp32.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

__all__ = ["CACHE_INT8", "MAX_HEAD_DIM", "MAX_NORM_WIDTH", "PLACEMENTS", "AttnPlan", "BlockPlan", "attend", "attn_step",
           "available", "block_rows", "gemm_rows", "gemv", "mlp_step", "openmp", "quantize", "rmsnorm",
           "rope", "set_threads", "swiglu", "threads", "usable"]

MAX_HEAD_DIM = 256  # DMAX in cpu_kernels.c

# the library is built from cpu_steps.c, which includes cpu_kernels.c: one translation unit
_SOURCES = (Path(__file__).with_name("cpu_steps.c"), Path(__file__).with_name("cpu_kernels.c"))
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _cache_dir() -> Path:
    return Path(os.environ.get("CASA_KERNEL_DIR") or Path.home() / ".cache" / "casa" / "kernels")


def _build() -> Path | None:
    """The compiled library's path (built once per source, machine and compiler), or None."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    flags = ["-O3", "-shared", "-fPIC", "-std=c99"]
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        flags.append("-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native")
    source = b"".join(path.read_bytes() for path in _SOURCES)
    # the flags are part of the key: a library built another way is another library
    build = f"{platform.machine()} {platform.processor()} {cc} {' '.join(flags)} -fopenmp?"
    key = hashlib.sha256(source + build.encode()).hexdigest()[:16]
    lib = _cache_dir() / f"casa_kernels_{key}.so"
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # built beside its final name and renamed: a concurrent process never loads a half-written file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        try:  # OpenMP where the compiler has it (the kernels' threads); without it they run on one
            subprocess.run([cc, *flags, "-fopenmp", "-o", tmp, str(_SOURCES[0]), "-lm"], check=True,
                           capture_output=True, timeout=120)
        except subprocess.CalledProcessError:
            subprocess.run([cc, *flags, "-o", tmp, str(_SOURCES[0]), "-lm"], check=True, capture_output=True,
                           timeout=120)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)  # as the compiler would have made it (mkstemp makes files 0600)
        os.replace(tmp, lib)
    except (OSError, subprocess.SubprocessError) as e:
        Path(tmp).unlink(missing_ok=True)
        err = getattr(e, "stderr", b"") or b""
        print(f"casa: CPU decode kernels not built ({cc}: {err.decode(errors='replace')[:200] or e}); "
              "decoding uses PyTorch's kernels", file=sys.stderr)
        return None
    return lib


@functools.cache
def _lib():
    if os.environ.get("CASA_CPU_KERNELS", "1") == "0":
        return None
    path = _build()
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    p, i, f = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    for name in ("casa_gemv_f32", "casa_gemv_bf16"):
        getattr(lib, name).argtypes = [p, p, p, p, i, i]
        getattr(lib, name).restype = None
    for name in ("casa_attend_f32", "casa_attend_bf16"):
        getattr(lib, name).argtypes = [p, p, p, p, p, p, i, i, i, i, i, i, i, f]
        getattr(lib, name).restype = None
    lib.casa_attend_i8.argtypes = [p, p, p, p, p, i, p, p, p, i, i, i, i, i, i, i, f]
    lib.casa_attend_i8.restype = None
    lib.casa_quantize.argtypes = [p, p, p, i, i]
    lib.casa_quantize.restype = None
    for name in ("casa_rmsnorm_f32", "casa_rmsnorm_bf16"):
        getattr(lib, name).argtypes = [p, p, p, i, i, f]
        getattr(lib, name).restype = None
    for name in ("casa_swiglu_f32", "casa_swiglu_bf16"):
        getattr(lib, name).argtypes = [p, p, p, p, p, i, i, i]
        getattr(lib, name).restype = None
    for name in ("casa_rope_f32", "casa_rope_bf16"):
        getattr(lib, name).argtypes = [p, p, p, p, i, i, i]
        getattr(lib, name).restype = None
    for name in ("casa_attn_step_f32", "casa_attn_step_bf16"):
        getattr(lib, name).argtypes = [p, p, f, p, p, p, p, p, p, p, ctypes.c_int, p, p, i, i, i, i, i, p, i, i, i, i]
        getattr(lib, name).restype = ctypes.c_int
    for name in ("casa_mlp_step_f32", "casa_mlp_step_bf16"):
        getattr(lib, name).argtypes = [p, p, f, p, p, p, i, i, i]
        getattr(lib, name).restype = ctypes.c_int
    for name in ("casa_block_rows_f32", "casa_block_rows_bf16"):
        getattr(lib, name).argtypes = [ctypes.POINTER(ctypes.POINTER(BlockPlan)), i, p, p, p]
        getattr(lib, name).restype = ctypes.c_int
    for name in ("casa_gemm_rows_f32", "casa_gemm_rows_bf16"):
        getattr(lib, name).argtypes = [p, p, p, p, i, i, i]
        getattr(lib, name).restype = None
    lib.casa_set_threads.argtypes, lib.casa_set_threads.restype = [ctypes.c_int], None
    lib.casa_get_threads.argtypes, lib.casa_get_threads.restype = [], ctypes.c_int
    lib.casa_openmp.argtypes, lib.casa_openmp.restype = [], ctypes.c_int
    return lib


def available() -> bool:
    """Whether the kernels are built and loaded on this machine."""
    return _lib() is not None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels serve these operands: built, CPU, fp32/bf16, no autograd (whether a
    step takes them at all is the stream's decode path: `core.decode.resolve_decode`)."""
    if torch.is_grad_enabled() or _lib() is None:
        return False
    for t in tensors:  # a loop, not all(...): this runs for every cached attention of a decode step
        if not t.is_cpu or t.dtype not in _DTYPES:
            return False
    return True


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _f32(t: torch.Tensor) -> torch.Tensor:
    """`t` as contiguous fp32, without a copy when it already is (the per-token path counts its ops)."""
    if t.dtype != torch.float32:
        t = t.float()
    return t if t.is_contiguous() else t.contiguous()


@functools.cache
def _fns() -> dict:
    """The kernels by (name, operand dtype)."""
    lib = _lib()
    names = ("gemv", "gemm_rows", "attend", "rmsnorm", "rope", "swiglu", "attn_step", "mlp_step", "block_rows")
    return {(name, dtype): getattr(lib, f"casa_{name}_{suffix}") for name in names for dtype, suffix in _DTYPES.items()}


def set_threads(n: int) -> None:
    """The threads the kernels split their work over (output rows of a product, heads of an
    attention: every count gives the same bits); 1 by default. A process-wide setting, as
    `torch.set_num_threads` is. Without OpenMP (`openmp()` False) the kernels run on one."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"kernel threads {n!r}: expected an integer >= 1")
    _lib().casa_set_threads(n)


def threads() -> int:
    """The kernels' thread count (`set_threads`)."""
    return _lib().casa_get_threads()


def openmp() -> bool:
    """Whether the kernels were built with OpenMP (and so can use several threads)."""
    return bool(_lib().casa_openmp())


def gemv(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`weight @ x (+ bias)` in one pass over `weight`: `gemm_rows` of one row.

    Args:
        weight: `[O, I]`, fp32 or bf16, rows contiguous (`stride(1) == 1`, `stride(0) == I`).
        x: `[I]` (any float dtype; read as fp32).
        bias: `[O]` or None (read as fp32).
    Returns:
        `[O]` fp32.
    """
    return gemm_rows(weight, x.reshape(1, weight.shape[1]), bias)[0]


def gemm_rows(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T (+ bias)` for a few rows, each weight row read once for all of them; a row's
    outputs have the bits `gemv` gives it alone.

    Args:
        weight: `[O, I]`, fp32 or bf16, rows contiguous.
        x: `[B, I]` (any float dtype; read as fp32).
        bias: `[O]` or None (read as fp32).
    Returns:
        `[B, O]` fp32.
    """
    O, I = weight.shape
    if not weight.is_contiguous():
        raise ValueError(f"gemm_rows: weight of shape {tuple(weight.shape)} must be row-contiguous, "
                         f"got strides {weight.stride()}")
    if x.dim() != 2 or x.shape[1] != I:
        raise ValueError(f"gemm_rows: x of shape {tuple(x.shape)} for a weight of shape {tuple(weight.shape)}")
    x, bias = _f32(x), None if bias is None else _f32(bias)
    y = torch.empty(x.shape[0], O, dtype=torch.float32)
    _fns()["gemm_rows", weight.dtype](weight.data_ptr(), x.data_ptr(), _ptr(bias), y.data_ptr(), O, I, x.shape[0])
    return y


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """`down @ (silu(gate @ x) * (up @ x))` for one row, in one call (SwiGLU, `core.lm.MLP`).

    Args:
        x: `[I]` (read as fp32).
        gate_up: `[2F, I]`, the gate's rows then the up projection's; fp32 or bf16, contiguous.
        down: `[O, F]`, the same dtype, contiguous.
    Returns:
        `[O]` fp32 (bf16 weights: rounded where PyTorch's bf16 ops round, but the last product).
    """
    F2, I = gate_up.shape
    O, F = down.shape
    if F2 != 2 * F or gate_up.dtype != down.dtype or not (gate_up.is_contiguous() and down.is_contiguous()):
        raise ValueError(f"swiglu: gate_up {tuple(gate_up.shape)} {gate_up.dtype} and down {tuple(down.shape)} "
                         f"{down.dtype}: expected [2F, I] and [O, F], one dtype, contiguous")
    x = _f32(x.reshape(I))
    h, y = torch.empty(2 * F, dtype=torch.float32), torch.empty(O, dtype=torch.float32)
    _fns()["swiglu", down.dtype](gate_up.data_ptr(), down.data_ptr(), x.data_ptr(), h.data_ptr(), y.data_ptr(),
                                 I, F, O)
    return y


MAX_NORM_WIDTH = 16384  # the row buffer of casa_rmsnorm_bf16


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x / sqrt(mean(x^2) + eps))` over the last dim, as `core.lm.RMSNorm` computes it
    (normalized in fp32, rounded to `x`'s dtype, scaled by `weight` in that dtype).

    Args:
        x: `[..., I]`, fp32 or bf16, contiguous; `I <= MAX_NORM_WIDTH`.
        weight: `[I]`, the same dtype.
    Returns:
        `[..., I]`, `x`'s dtype.
    """
    I = x.shape[-1]
    if x.dtype != weight.dtype or not x.is_contiguous() or I > MAX_NORM_WIDTH:
        raise ValueError(f"rmsnorm: x {tuple(x.shape)} {x.dtype} and weight {weight.dtype} must share a dtype, "
                         f"x contiguous and at most {MAX_NORM_WIDTH} wide")
    out = torch.empty_like(x)
    weight = weight if weight.is_contiguous() else weight.contiguous()
    _fns()["rmsnorm", x.dtype](x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // I, I, eps)
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + roll(x, D/2) * signed_sin` for one token's heads, as `core.lm.Rotary.apply` computes it.

    Args:
        x: `[..., H, D]` with one token (`x.shape[:-2].numel() == 1`), fp32 or bf16, `stride(-1) == 1`
            (heads may be further apart than `D`: a slice of a packed projection).
        cos, signed_sin: `[D]` elements (any leading ones), `x`'s dtype, contiguous.
    Returns:
        `x`'s shape and dtype, contiguous.
    """
    H, D = x.shape[-2:]
    if x.stride(-1) != 1 or cos.dtype != x.dtype or signed_sin.dtype != x.dtype or cos.numel() != D:
        raise ValueError(f"rope: x {tuple(x.shape)} {x.dtype} strides {x.stride()}, tables {cos.dtype} "
                         f"{tuple(cos.shape)}: one token, rows contiguous, tables of {D} in x's dtype")
    out = torch.empty(x.shape, dtype=x.dtype)
    _fns()["rope", x.dtype](x.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), out.data_ptr(), H, D, x.stride(-2))
    return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
           scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of few queries over cached keys/values, one pass over each per key/value head.

    Args:
        q: `[Hkv, N, D]` queries, grouped by the key/value head they read (any float dtype; read
            as fp32). Query `n` of a head uses mask row `n % T`.
        k, v: `[Hkv, S, D]`, fp32, bf16 or int8, same dtype and strides; rows contiguous
            (`stride(2) == 1`), `stride(1)` apart and heads `stride(0)` apart, e.g. a slice of
            `KVCache`'s buffer.
        mask: bool `[T, S]` (True = attend) or None (every key visible).
        scale: multiplies the scores (`1 / sqrt(D)` for plain attention).
        k_scale, v_scale: int8 `k`/`v` only: fp32 `[Hkv, S]`, rows contiguous; the keys/values
            attended are `k * k_scale[..., None]`, `v * v_scale[..., None]`.
    Returns:
        `[Hkv, N, D]` fp32; a query with no visible key gets zeros.
    """
    Hkv, N, D = q.shape
    S = k.shape[1]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"attend: head width {D} over the kernel's {MAX_HEAD_DIM}")
    if k.dtype != v.dtype or k.shape != v.shape or k.stride() != v.stride() or k.stride(2) != 1:
        raise ValueError(f"attend: k {tuple(k.shape)} {k.dtype} {k.stride()} and v {tuple(v.shape)} "
                         f"{v.dtype} {v.stride()} must match, rows contiguous")
    int8 = k.dtype == torch.int8
    if int8 and not all(s is not None and s.dtype == torch.float32 and s.shape == (Hkv, S) and s.stride(1) == 1
                        and s.stride() == k_scale.stride() for s in (k_scale, v_scale)):
        raise ValueError(f"attend: int8 k/v {tuple(k.shape)} need fp32 k_scale/v_scale [{Hkv}, {S}] with rows "
                         "contiguous and equal strides")
    q = _f32(q)
    T = 1 if mask is None else mask.shape[0]
    m = None if mask is None else mask.contiguous().view(torch.uint8)  # bool is one byte
    out = torch.empty(Hkv, N, D, dtype=torch.float32)
    scores = torch.empty(N, S, dtype=torch.float32)
    common = (_ptr(m), scores.data_ptr(), out.data_ptr(), Hkv, N, T, S, D, k.stride(1), k.stride(0), scale)
    if int8:
        _lib().casa_attend_i8(q.data_ptr(), k.data_ptr(), v.data_ptr(), k_scale.data_ptr(), v_scale.data_ptr(),
                              k_scale.stride(0), *common)
    else:
        _fns()["attend", k.dtype](q.data_ptr(), k.data_ptr(), v.data_ptr(), *common)
    return out


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`inference.cache.quantize` (int8 rows, one fp32 scale each, the same bits) in one call.

    Args:
        x: `[..., D]`, fp32 or bf16 (read as fp32).
    Returns:
        `(q [..., D] int8, scale [...] fp32)`.
    """
    D = x.shape[-1]
    x = _f32(x)
    q = torch.empty(x.shape, dtype=torch.int8)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32)
    _lib().casa_quantize(x.data_ptr(), q.data_ptr(), scale.data_ptr(), x.numel() // D, D)
    return q, scale


def attn_step(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, qkv: torch.Tensor, bias: torch.Tensor | None,
              o: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, k_cache: torch.Tensor,
              v_cache: torch.Tensor, *, row: int, held: int, heads: int, k_scale: torch.Tensor | None = None,
              v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One token through an attention sublayer whose key/value join a cache, in one call:
    `o @ attend(rope(q), [cache; rope(k), v])`, `q, k, v = qkv @ rmsnorm(h) (+ bias)` (grouped heads;
    the same bits as `rmsnorm`, `gemv`, `rope` and `attend` called one by one).

    Args:
        h: `[I]` states (before the norm), contiguous; `norm_weight [I]`, `eps`: the RMSNorm.
        qkv: `[(heads + 2 Hkv) D, I]`, the query rows then the key and value rows; `bias`: fp32 or None.
        o: `[I, heads D]`.
        rope: `(cos, signed_sin)`, `D` elements each, or None (no RoPE).
        k_cache, v_cache: `[1, Hkv, capacity, D]` contiguous buffers: the new key/value go to
            `row`, then rows `[0, held)` are attended (`row < held <= capacity`).
        k_scale, v_scale: with int8 caches, their fp32 scales `[1, Hkv, capacity]`, contiguous
            (the new row is quantized by `inference.cache.quantize`'s rule).
        All tensors but the bias, the output and an int8 cache share `h`'s dtype (fp32 or bf16).
    Returns:
        `[I]` fp32 (bf16: before the cast to bf16 the per-op path makes).
    """
    _, Hkv, cap, D = k_cache.shape
    I = h.numel()
    int8 = k_cache.dtype == torch.int8
    scales_fit = all(s is not None and s.shape == (1, Hkv, cap) and s.dtype == torch.float32 and s.is_contiguous()
                     for s in (k_scale, v_scale)) if int8 else k_cache.dtype == h.dtype
    if not (0 <= row < held <= cap and D <= MAX_HEAD_DIM and heads % Hkv == 0 and k_cache.is_contiguous()
            and v_cache.is_contiguous() and k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype
            and scales_fit and qkv.shape == ((heads + 2 * Hkv) * D, I) and o.shape == (I, heads * D)):
        raise ValueError(f"attn_step: h [{I}] {h.dtype}, qkv {tuple(qkv.shape)}, o {tuple(o.shape)}, cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}, {heads} heads, row {row} of {held}: shapes or "
                         "dtypes do not agree (int8 caches need their fp32 scales)")
    y = torch.empty(I, dtype=torch.float32)
    cos, ssin = (None, None) if rope is None else rope
    rc = _fns()["attn_step", h.dtype](h.data_ptr(), norm_weight.data_ptr(), eps, qkv.data_ptr(), _ptr(bias),
                                      o.data_ptr(), _ptr(cos), _ptr(ssin), k_cache.data_ptr(), v_cache.data_ptr(),
                                      CACHE_INT8 if int8 else 0, _ptr(k_scale), _ptr(v_scale), cap, row, held, D,
                                      cap * D, y.data_ptr(), I, heads, Hkv, D)
    if rc:
        raise MemoryError(f"attn_step: no memory for the scratch of {held} cached positions")
    return y


def mlp_step(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_up: torch.Tensor,
             down: torch.Tensor) -> torch.Tensor:
    """`swiglu(rmsnorm(h), gate_up, down)` for one token, in one call (same bits as the two calls).

    Args:
        h: `[I]` states, contiguous; `norm_weight [I]`, `gate_up [2F, I]`, `down [O, F]` in its dtype.
    Returns:
        `[O]` fp32.
    """
    F2, I = gate_up.shape
    O, F = down.shape
    if F2 != 2 * F or h.numel() != I or norm_weight.numel() != I:
        raise ValueError(f"mlp_step: h [{h.numel()}], gate_up {tuple(gate_up.shape)}, down {tuple(down.shape)}: "
                         "expected [I], [2F, I], [O, F]")
    y = torch.empty(O, dtype=torch.float32)
    if _fns()["mlp_step", h.dtype](h.data_ptr(), norm_weight.data_ptr(), eps, gate_up.data_ptr(), down.data_ptr(),
                                   y.data_ptr(), I, F, O):
        raise MemoryError("mlp_step: no memory for its scratch")
    return y


CACHE_INT8 = 2  # KIND_I8 in cpu_kernels.c: an int8 cache with scales (0: the weights' dtype)


class AttnPlan(ctypes.Structure):
    """`struct casa_attn_plan`: one attention sublayer of a `BlockPlan` (`attn_step`'s operands).
    The cache fields (`kc`, `vc`, `row`, `held`, `hs`: a head's elements; int8 `cache`: the scales
    `ksc`, `vsc`, a head's `ss`) change every token."""
    _fields_ = [("norm_w", ctypes.c_void_p), ("Wqkv", ctypes.c_void_p), ("Wo", ctypes.c_void_p),
                ("b", ctypes.c_void_p), ("kc", ctypes.c_void_p), ("vc", ctypes.c_void_p), ("ksc", ctypes.c_void_p),
                ("vsc", ctypes.c_void_p), ("row", ctypes.c_long), ("held", ctypes.c_long), ("hs", ctypes.c_long),
                ("ss", ctypes.c_long), ("H", ctypes.c_long), ("Hkv", ctypes.c_long), ("D", ctypes.c_long),
                ("eps", ctypes.c_float), ("rope", ctypes.c_int), ("cache", ctypes.c_int)]


PLACEMENTS = {None: 0, "parallel": 1, "before": 2, "replace": 3}  # a block without fusion layer, then §3's


class BlockPlan(ctypes.Structure):
    """`struct casa_block_plan`: a decoder block for `block_rows` (`placement`: `PLACEMENTS`)."""
    _fields_ = [("sa", AttnPlan), ("fusion", AttnPlan), ("mlp_norm_w", ctypes.c_void_p), ("Wgu", ctypes.c_void_p),
                ("Wd", ctypes.c_void_p), ("I", ctypes.c_long), ("F", ctypes.c_long), ("mlp_eps", ctypes.c_float),
                ("placement", ctypes.c_int)]


def block_rows(plans: list[BlockPlan], hs: list[torch.Tensor], ropes: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Several streams' decoded tokens through one decoder block, in place, in one call: what
    `core.model.Block.step` computes for each (to summation order), each row with the bits it gets
    alone, the block's weights read once for all of them.

    Args:
        plans: one per row, over the same weights, each pointing into its stream's caches.
        hs: `[I]` states per row, one dtype, contiguous; overwritten with the block's output.
        ropes: `(cos, signed_sin)` per row (its position), `D` elements each, the states' dtype.
    """
    B = len(plans)
    if not (B == len(hs) == len(ropes)) or any(h.numel() != plans[0].I or not h.is_contiguous()
                                                or h.dtype != hs[0].dtype for h in hs):
        raise ValueError(f"block_rows: {B} plans, {len(hs)} states and {len(ropes)} tables of width "
                         f"{plans[0].I if plans else '?'} in one dtype expected")
    P = (ctypes.POINTER(BlockPlan) * B)(*(ctypes.pointer(p) for p in plans))
    H = (ctypes.c_void_p * B)(*(h.data_ptr() for h in hs))
    C = (ctypes.c_void_p * B)(*(r[0].data_ptr() for r in ropes))
    S = (ctypes.c_void_p * B)(*(r[1].data_ptr() for r in ropes))
    if _fns()["block_rows", hs[0].dtype](P, B, H, C, S):
        raise MemoryError("block_rows: no memory for its scratch")
