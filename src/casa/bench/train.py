"""`casa bench train`: one training step per fusion variant on the same packed data.

Design decisions:
- Same LM (same seed, same weights) for every variant; `ca` and `casa` add a
  fusion layer to every block. Same row: one image (`tokens_per_image`
  tokens) then ~`tokens_per_image / image_ratio` text tokens, repeated, so
  image tokens are `image_ratio` x text tokens, as in the paper's budgets
  (2048 text + 20480 image). `layout="packed"`: each image + text is a
  document of its own (packed training samples); `"interleaved"`: one long
  document (a video or a long chat).
- Images enter as precomputed LM-width embeddings (a frozen vision encoder),
  identical for every variant, so the step measures what fusion costs.
- A step is forward + answer-token loss + backward + AdamW update. Reported:
  text tokens/s (median over `repeats` steps, after one warm-up step) and the
  peak memory of a step (`PeakMemory`: CUDA allocator peak, or the RSS
  high-water mark on CPU).
- Every variant runs in a fresh subprocess, so memory freed by one variant
  can never hide the next one's peak. Sizes and variant names are checked
  before the first one starts (`bench_config`, `check_variants`).
- The JSON report is written atomically (`casa.files.atomic_file`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from casa.bench.report import write_report
from casa.config import FUSION_VARIANTS

__all__ = ["bench_config", "check_variants", "cpu_name", "measure", "measure_or_oom", "packed_batch", "run"]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def bench_config(*, text_tokens: int = 512, image_ratio: int = 10, tokens_per_image: int = 256,
                 d_model: int = 256, n_layers: int = 4, repeats: int = 3, seed: int = 0,
                 threads: int | None = None, layout: str = "packed", lm: dict | None = None,
                 precision: str = "fp32") -> dict:
    """The benchmark's settings (model size, token budgets, repeats) as a JSON-able dict.

    `lm` overrides the LM's shape derived from `d_model` (n_heads, n_kv_heads, d_ff,
    vocab_size, tie_embeddings, ...: `LMConfig` fields), for the paper's model shapes;
    `precision="bf16"` runs the step under bf16 autocast."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"bench train: precision={precision!r}, expected 'fp32' or 'bf16'")
    if layout not in ("packed", "interleaved"):
        raise ValueError(f"bench train: layout={layout!r}, expected 'packed' or 'interleaved'")
    if d_model < 16:
        raise ValueError(f"bench train: --d-model {d_model}: expected at least 16")
    if text_tokens * image_ratio < tokens_per_image:
        raise ValueError(f"bench train: --text-tokens {text_tokens} x --image-ratio {image_ratio} is less than one "
                         f"image ({tokens_per_image} tokens)")
    n_images = text_tokens * image_ratio // tokens_per_image
    if text_tokens < 2 * n_images:  # each document: its image, then at least two text tokens
        raise ValueError(f"bench train: --text-tokens {text_tokens} is too few for {n_images} images "
                         f"(at least 2 text tokens per image); lower --image-ratio or raise --text-tokens")
    return {"threads": threads or torch.get_num_threads(), "layout": layout, "text_tokens": text_tokens,
            "image_ratio": image_ratio, "tokens_per_image": tokens_per_image,
            "image_tokens": text_tokens * image_ratio, "d_model": d_model, "n_layers": n_layers,
            "n_heads": max(1, d_model // 64), "d_ff": int(d_model * 8 / 3) // 16 * 16, "vocab_size": 264,
            "repeats": repeats, "seed": seed, "images": "precomputed embeddings (frozen encoder)",
            "lm": dict(lm or {}), "precision": precision}


def check_variants(variants) -> list[str]:
    """`variants` as a list, or a ValueError naming the unknown ones."""
    variants = list(variants)
    bad = [v for v in variants if v not in FUSION_VARIANTS]
    if bad or not variants:
        raise ValueError(f"bench train: unknown variant(s) {bad or variants}; expected names from "
                         f"{', '.join(FUSION_VARIANTS)}")
    return variants


def _model_config(cfg: dict, variant: str, fusion: dict | None = None):
    """The benchmark's model; `fusion` overrides the fusion config (placement, text keys, ...)."""
    from casa.config import ModelConfig

    heads = cfg["n_heads"]
    return ModelConfig.from_dict({
        "lm": {"vocab_size": cfg["vocab_size"], "d_model": cfg["d_model"], "n_layers": cfg["n_layers"],
               "n_heads": heads, "n_kv_heads": heads, "d_ff": cfg["d_ff"], **cfg.get("lm", {})},
        # 16 x 16 patches: tokens_per_image = 256 with the default
        "vision": {"image_size": 8 * int(cfg["tokens_per_image"] ** 0.5), "patch_size": 8, "d_model": 32,
                   "n_layers": 1, "n_heads": 1, "d_ff": 32},
        "fusion": {"variant": variant, "every": 1, **(fusion or {})},
    })


def packed_batch(cfg: dict, device):
    """One row of documents `[image ; text]`, image tokens = image_ratio x text tokens.

    Returns:
        a `Batch` on `device`: `input_ids [1, T]` long, `image_embeds [N, n, d_model]`
        float32 (precomputed, LM width), `insertion_points [N]` long, `loss_mask [1, T]` bool.
    """
    from casa.core.batch import Batch

    g = torch.Generator().manual_seed(cfg["seed"])
    T, n = cfg["text_tokens"], cfg["tokens_per_image"]
    n_images = cfg["image_tokens"] // n
    base, extra = divmod(T, n_images)
    lens = [base + (i < extra) for i in range(n_images)]
    starts = torch.tensor([0, *lens[:-1]]).cumsum(0)
    doc_lens = [lens] if cfg["layout"] == "packed" else [[T]]
    ids = torch.randint(0, 256, (1, T), generator=g)
    loss_mask = torch.ones(1, T, dtype=torch.bool)
    embeds = torch.randn(n_images, n, cfg["d_model"], generator=g) * 0.02
    return Batch(input_ids=ids, image_embeds=embeds, image_rows=torch.zeros(n_images, dtype=torch.long),
                 insertion_points=starts + 1, doc_lens=doc_lens, loss_mask=loss_mask).to(device)


def measure(cfg: dict, variant: str, device: str = "auto", fusion: dict | None = None) -> dict:
    """Time and peak memory of training steps of one variant (in this process): text tokens/s
    (median over `repeats`), seconds per step, peak bytes (None where unmeasurable), parameters."""
    from casa.bench.memory import PeakMemory
    from casa.core.loss import lm_loss
    from casa.core.model import CasaModel

    device = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    model = CasaModel(_model_config(cfg, variant, fusion)).to(device).train()
    model.vision.requires_grad_(False)  # images are precomputed embeddings
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = packed_batch(cfg, device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.get("precision") == "bf16"):
            loss = lm_loss(model(batch), batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return float(loss.detach())

    step()  # warm-up: optimizer state allocated, kernels chosen
    with PeakMemory(device) as pm:
        step()
    times = []
    for _ in range(cfg["repeats"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    seq = cfg["text_tokens"] + (cfg["image_tokens"] if variant == "insertion" else 0)
    return {"variant": variant, "oom": False, "text_tok_s": cfg["text_tokens"] / sec, "step_s": sec,
            "peak_mem_bytes": pm.bytes, "sequence_tokens": seq, "params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run(json_path="benchmarks/train.json", *, variants=("insertion", "ca", "casa"), text_tokens: int = 512,
        image_ratio: int = 10, repeats: int = 3, d_model: int = 256, n_layers: int = 4,
        tokens_per_image: int = 256, threads: int | None = None, layout: str = "packed", lm: dict | None = None,
        precision: str = "fp32", extra: dict | None = None) -> dict:
    """Measure every variant in its own process; print a line each, write the JSON report; returns it."""
    variants = check_variants(variants)
    cfg = bench_config(text_tokens=text_tokens, image_ratio=image_ratio, tokens_per_image=tokens_per_image,
                       d_model=d_model, n_layers=n_layers, repeats=repeats, threads=threads, layout=layout,
                       lm=lm, precision=precision)
    cfg.update(extra or {})
    results = []
    for v in variants:
        out = subprocess.run([sys.executable, "-m", "casa.bench.train", json.dumps(cfg), v],
                             capture_output=True, text=True, env={**os.environ})
        if out.returncode != 0:
            raise RuntimeError(f"bench train: variant {v} failed:\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        if r.get("oom"):
            print(f"{v:<10} out of memory")
            continue
        mem = f"{r['peak_mem_bytes'] / 2**20:,.0f} MiB" if r["peak_mem_bytes"] is not None else "n/a"
        print(f"{v:<10} {r['text_tok_s']:>10,.0f} text tok/s  peak {mem:>10}  ({r['step_s'] * 1000:.0f} ms/step)")
    by = {r["variant"]: r for r in results if not r.get("oom")}
    if "insertion" in by and "casa" in by:
        ins, casa = by["insertion"], by["casa"]
        cfg["casa_vs_insertion"] = {
            "throughput_x": casa["text_tok_s"] / ins["text_tok_s"],
            "memory_x": (casa["peak_mem_bytes"] / ins["peak_mem_bytes"]) if ins["peak_mem_bytes"] else None}
        print(f"casa vs insertion: {cfg['casa_vs_insertion']['throughput_x']:.2f}x throughput, "
              f"{cfg['casa_vs_insertion']['memory_x'] or float('nan'):.2f}x peak memory")
    cfg["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
    cfg["torch"] = torch.__version__
    cfg["cuda"] = torch.version.cuda
    report = {"config": cfg, "results": results}
    write_report(report, json_path)
    return report


def measure_or_oom(cfg: dict, variant: str) -> dict:
    """`measure`, with running out of accelerator memory recorded as a result (the
    paper's insertion runs out too), not raised."""
    try:
        return measure(cfg, variant)
    except torch.OutOfMemoryError:
        return {"variant": variant, "oom": True, "text_tok_s": None, "step_s": None, "peak_mem_bytes": None,
                "sequence_tokens": None, "params": None}


if __name__ == "__main__":  # one variant, in a fresh process: python -m casa.bench.train CONFIG_JSON VARIANT
    print(json.dumps(measure_or_oom(json.loads(sys.argv[1]), sys.argv[2])))
