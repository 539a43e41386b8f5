"""`casa bench attention`: every backend on one packed batch, side by side.

The batch packs `windows` documents, each one image of `image_tokens` tokens
followed by `text_tokens` text tokens, in one row: the shape of CASA training
data. Each backend runs the same fusion attention (CASA, text keys on, GQA
off) forward, and forward+backward where it has a backward, and is compared
with the dense reference on the same inputs.

`gflops` counts the useful work only: for each window, queries times
[image keys + the causal half of the text keys], two matmuls (QK^T, PV) in
the forward, and 2.5x that in the backward. A dense-GEMM rate measured in the
same run gives the scale.

Design decisions:
- Every backend is checked against the dense reference on the same inputs
  (outputs and gradients) in the same run, so a fast wrong backend shows.
- Times are the best of `repeats` after a warm-up (compilation and mask
  building excluded); peak memory is measured on fresh leaves after the timed
  runs are released, so it counts one step and nothing left over.
- The JSON report is written atomically (`casa.files.atomic_file`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from casa.bench.memory import PeakMemory
from casa.bench.report import write_report
from casa.core.attention import BACKENDS, flash_available, fusion_attend
from casa.core.layout import build_layout

__all__ = ["available_backends", "gemm_gflops", "run"]


def _timed(fn, repeats: int, device) -> float:
    """Best of `repeats` wall-clock runs, in milliseconds, after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def gemm_gflops(device, dtype, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = _timed(lambda: a @ b, repeats, device)
    return 2 * size**3 / (ms * 1e-3) / 1e9


def available_backends(device) -> list[str]:
    out = []
    for b in BACKENDS:
        if b == "flash" and not flash_available():
            continue
        out.append(b)
    return out


def run(*, json_path: str | None, windows: int = 16, image_tokens: int = 256, text_tokens: int = 256,
        heads: int = 8, head_dim: int = 64, backends: list[str] | None = None, repeats: int = 5,
        plot_path: str | None = None, device: str | None = None, dtype: str = "float32", seed: int = 0) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype)
    backends = backends or available_backends(dev)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"--backends: unknown {unknown}; choose from {list(BACKENDS)}")

    W, N, L, H, D = windows, image_tokens, text_tokens, heads, head_dim
    T = W * L
    layout = build_layout(T, [[L] * W], torch.zeros(W, dtype=torch.long), torch.arange(W) * L, N, device=dev)
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dev, dt)

    inputs = [rand(1, T, H, D), rand(1, T, H, D), rand(1, T, H, D), rand(W * N, H, D), rand(W * N, H, D)]
    grad_out = rand(1, T, H, D)
    fwd_flops = 4 * W * H * L * (N + (L + 1) / 2) * D
    gemm = gemm_gflops(dev, dt)

    def forward(backend, leaves):
        return fusion_attend(*leaves, layout, text_keys=True, backend=backend)

    with torch.no_grad():
        reference = forward("reference", inputs)
    ref_leaves = [x.clone().requires_grad_(True) for x in inputs]
    forward("reference", ref_leaves).backward(grad_out)
    ref_grads = [x.grad for x in ref_leaves]

    results = []
    for backend in backends:
        trains = not (backend == "flex" and dev.type == "cpu")  # FlexAttention has no CPU backward
        with torch.no_grad():
            out = forward(backend, inputs)  # also compiles / builds cached masks
            fwd_ms = _timed(lambda: forward(backend, inputs), repeats, dev)
        err = (out.float() - reference.float()).abs().max().item()
        fwd_bwd_ms, grad_err = None, None

        def step(leaves):
            for x in leaves:
                x.grad = None
            forward(backend, leaves).backward(grad_out)

        if trains:
            leaves = [x.clone().requires_grad_(True) for x in inputs]
            fwd_bwd_ms = _timed(lambda: step(leaves), repeats, dev)
            grad_err = max((x.grad.float() - r.float()).abs().max().item() for x, r in zip(leaves, ref_grads))
        out = leaves = None  # nothing of the timed runs is held while memory is measured
        fresh = [x.clone().requires_grad_(trains) for x in inputs]
        with PeakMemory(dev) as pm:
            step(fresh) if trains else forward(backend, fresh).sum()
        fresh = None
        results.append({
            "backend": backend,
            "fwd_ms": round(fwd_ms, 3),
            "fwd_bwd_ms": None if fwd_bwd_ms is None else round(fwd_bwd_ms, 3),
            "peak_mem_bytes": pm.bytes,
            "max_abs_err": err,
            "max_abs_grad_err": grad_err,
            "gflops": round(fwd_flops / (fwd_ms * 1e-3) / 1e9, 2),
            "gflops_fwd_bwd": None if fwd_bwd_ms is None else round(3.5 * fwd_flops / (fwd_bwd_ms * 1e-3) / 1e9, 2),
        })
        print(_row(results[-1], gemm), flush=True)

    report = {
        "shape": {"windows": W, "image_tokens": N, "text_tokens": L, "heads": H, "head_dim": D,
                  "batch": 1, "dtype": dtype},
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "gemm_gflops": round(gemm, 2),
        "results": results,
        "ratios_vs_reference": _ratios(results),
        "notes": "fwd_ms/fwd_bwd_ms: best of repeats; gflops: useful forward FLOPs "
                 "(images + causal half of text) per second; peak_mem_bytes: one forward+backward "
                 "(forward only where no backward) above the memory in use before it.",
    }
    speedups = "; ".join(f"{b} {r['fwd_speedup']:.1f}x forward"
                         + (f", {r['fwd_bwd_speedup']:.1f}x forward+backward" if r["fwd_bwd_speedup"] else "")
                         for b, r in report["ratios_vs_reference"].items() if b != "reference")
    print(f"dense GEMM: {gemm:.1f} GFLOP/s" + (f"; speed-up vs reference: {speedups}" if speedups else ""))
    write_report(report, json_path, plot=_plot, plot_path=plot_path)
    return report


def _ratios(results) -> dict:
    ref = next((r for r in results if r["backend"] == "reference"), None)
    if ref is None:
        return {}
    out = {}
    for r in results:
        out[r["backend"]] = {
            "fwd_speedup": round(ref["fwd_ms"] / r["fwd_ms"], 2),
            "fwd_bwd_speedup": None if r["fwd_bwd_ms"] is None or ref["fwd_bwd_ms"] is None
            else round(ref["fwd_bwd_ms"] / r["fwd_bwd_ms"], 2),
        }
    return out


def _row(r, gemm) -> str:
    fb = "-" if r["fwd_bwd_ms"] is None else f"{r['fwd_bwd_ms']:.1f}"
    mem = "?" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.0f} MiB"
    return (f"{r['backend']:>10}: fwd {r['fwd_ms']:8.1f} ms  fwd+bwd {fb:>8} ms  peak {mem:>9}  "
            f"err {r['max_abs_err']:.1e}  {r['gflops']:7.1f} GFLOP/s ({100 * r['gflops'] / gemm:.0f}% of GEMM)")


def _plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = report["results"]
    names = [r["backend"] for r in rs]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    at = range(len(rs))  # side by side, one colour each: overlaid bars hid the forward ones
    axes[0].bar([i - 0.2 for i in at], [r["fwd_ms"] for r in rs], width=0.4, color="tab:blue", label="forward")
    axes[0].bar([i + 0.2 for i in at], [r["fwd_bwd_ms"] or 0 for r in rs], width=0.4, color="tab:orange",
                label="forward+backward")
    axes[0].set_xticks(list(at), names)
    axes[0].set_ylabel("ms (log)")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].bar(names, [r["gflops"] for r in rs])
    axes[1].axhline(report["gemm_gflops"], color="k", ls="--", label="dense GEMM")
    axes[1].set_ylabel("GFLOP/s (forward)")
    axes[1].legend()
    s = report["shape"]
    fig.suptitle(f"{s['windows']} windows x ({s['image_tokens']} image + {s['text_tokens']} text), "
                 f"{s['heads']}x{s['head_dim']} heads, {report['device']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
