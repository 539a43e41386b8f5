"""`casa bench paper`: the paper's cost table at its model shapes, with random weights.

Design decisions:
- Presets, not new benchmarks: the training rows are `casa.bench.train` and
  the streaming rows `casa.bench.stream`, run at the shapes of the paper's
  language models (docs/design.md §7). Random weights: cost does not depend
  on what the weights are, and nothing is downloaded.
- Training (the paper's Table 1): one pack of 2048 text + 20480 image tokens
  (20 frames of 1024 tokens, a 896-pixel frame through Qwen2.5-VL's 28-pixel
  merged patches), every variant's fusion layer in every block, bf16
  autocast, AdamW; text tokens/s and peak memory per variant.
- Streaming: 512 turns of one 896-pixel frame (1024 image tokens) and 16
  generated tokens, as in the release benchmark (docs/design.md §7); time to
  first token, decode speed, KV tokens and peak memory per turn.
- Running out of memory is a result (recorded as `oom`), as in the paper,
  where insertion cannot finish long sessions.
- `--preset tiny` runs the same code at a toy shape on CPU (CI does), so the
  GPU run is the same path with bigger numbers.
- Output under `benchmarks/gpu/`: `paper_<preset>_train.json`,
  `paper_<preset>_stream.json` (+ `.png`), each with the device, torch and
  CUDA versions and the command that made it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

__all__ = ["PRESETS", "run"]

# LM shapes (hidden size, layers, heads / KV heads, FFN width, vocabulary) of the
# paper's models, from their published configurations.
PRESETS = {
    "qwen2.5-vl-3b": {"d_model": 2048, "n_layers": 36, "n_heads": 16, "n_kv_heads": 2, "d_ff": 11008,
                      "vocab_size": 151936, "tokens_per_frame": 1024, "text_tokens": 2048, "image_ratio": 10,
                      "turns": 512, "frames_per_turn": 1, "new_tokens": 16},
    "helium-1-2b": {"d_model": 2560, "n_layers": 24, "n_heads": 20, "n_kv_heads": 20, "d_ff": 7040,
                    "vocab_size": 48000, "tokens_per_frame": 1024, "text_tokens": 2048, "image_ratio": 10,
                    "turns": 512, "frames_per_turn": 1, "new_tokens": 16},
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 176, "vocab_size": 264,
             "tokens_per_frame": 16, "text_tokens": 64, "image_ratio": 4, "turns": 6, "frames_per_turn": 1,
             "new_tokens": 2},
}


def run(preset: str, *, out_dir="benchmarks/gpu", device: str | None = None, variants=("insertion", "ca", "casa"),
        parts=("train", "stream"), repeats: int = 3, max_seconds: float = 1800.0) -> dict:
    """Run the preset's training and streaming benchmarks; write their JSON (+ plot); return both reports."""
    from casa.bench import stream as stream_bench
    from casa.bench import train as train_bench
    from casa.bench.report import write_report

    if preset not in PRESETS:
        raise ValueError(f"bench paper: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)
    command = " ".join(["casa", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith(("casa", "__main__.py")) else None
    lm = {"n_heads": p["n_heads"], "n_kv_heads": p["n_kv_heads"], "d_ff": p["d_ff"], "vocab_size": p["vocab_size"]}
    extra = {"preset": preset, "command": command}
    reports = {}
    if "train" in parts:
        reports["train"] = train_bench.run(
            out_dir / f"paper_{preset}_train.json", variants=variants, text_tokens=p["text_tokens"],
            image_ratio=p["image_ratio"], tokens_per_image=p["tokens_per_frame"], d_model=p["d_model"],
            n_layers=p["n_layers"], repeats=repeats, lm=lm, precision="bf16" if device == "cuda" else "fp32",
            threads=None if device == "cuda" else 1, extra=extra)
    if "stream" in parts:
        cfg = stream_bench.StreamBench(
            variants=list(variants), turns=p["turns"], image_tokens=p["frames_per_turn"] * p["tokens_per_frame"],
            new_tokens=p["new_tokens"], prompt_tokens=1, d_model=p["d_model"], layers=p["n_layers"],
            heads=p["n_heads"], kv_heads=p["n_kv_heads"], d_ff=p["d_ff"], vocab=p["vocab_size"],
            max_seconds=max_seconds, max_cache_bytes=1 << 50, device=device, threads=None if device == "cuda" else 1)
        report = stream_bench.run(cfg, json_path=None, isolate=True)
        report.setdefault("config", {}).update({**extra, "device_name": _device_name(device),
                                                "torch": torch.__version__, "cuda": torch.version.cuda})
        write_report(report, out_dir / f"paper_{preset}_stream.json", plot=stream_bench.plot,
                     plot_path=out_dir / f"paper_{preset}_stream.png")
        reports["stream"] = report
    return reports


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    from casa.bench.train import cpu_name

    return cpu_name()
