"""`casa bench live`: hours of a live stream through the live scheduler, on an accelerated clock.

A simulated camera sends `frames` synthetic frames at `fps` frames per second
of stream time; the reader (`casa.inference.live.LiveReader`, `realtime`)
paces them `speed` times faster than real time, and the caption loop
(`caption_newest`) captions the newest frame with a real `Captioner` (a
random-init casa model, the byte tokenizer, `new_tokens` tokens a caption,
the session's decode path) whenever it is free, as `casa caption` does on a
live source. Only the source's clock is accelerated: the model runs at its
own speed, so what a run measures is the scheduler at a given **load**, the
frame rate the source sends in real time over the caption rate the model
sustains (measured first, on a throwaway session, once its history is
full). `load` 0.5 is a model with time to spare; `load` 2 is twice the frame
rate it can sustain.

Reported, per block of `sample_every` captions: lag (end of generation -
capture) p50 / p95 / max, the drop rate, the caption time and the load it
makes (real frame rate x mean caption time: on a shared machine the model
slows when others run, and a load above 1 drops 1 - 1/load of the frames),
the process's resident memory and the session's cache (bytes and tokens);
over the whole run, lag percentiles
(in real milliseconds and in frame intervals of the real rate, the unit that
does not depend on the acceleration), drop rate, RSS and cache last / first
(first = the end of the first block, after the bounded history filled).

Design decisions:
- The frames come from a small pool of pre-drawn images, so the source costs
  next to nothing and the reader keeps its pace; every frame still goes
  through preprocessing, the vision tower and the session.
- Caption length is fixed (the end token is forbidden before `new_tokens`),
  so a random model's early stops do not make the load drift.
- Everything runs in this process, one torch thread for the model (the CPU
  kernel path): the reader thread is what a live run has beside it.
- The JSON records the commit, the machine's load average before and after,
  and the measured sustained rate, speed and load.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from casa.bench.memory import resident_bytes
from casa.bench.report import write_report
from casa.config import FusionConfig, LMConfig, ModelConfig, VisionConfig
from casa.core.layout import History
from casa.core.model import CasaModel
from casa.data.processor import Processor
from casa.inference.captioner import Captioner
from casa.inference.generate import EndOfTurnBias, Sampling
from casa.inference.live import LagStats, LiveReader, caption_newest
from casa.inference.sources import Frame
from casa.pretrained.tokenizer import ByteTokenizer

__all__ = ["LiveBench", "plot", "run"]


@dataclass
class LiveBench:
    frames: int = 10_000  # frames the simulated camera sends
    fps: float = 2.0  # its frame rate, in stream time
    load: float = 0.5  # real frame rate / the caption rate the model sustains
    speed: float | None = None  # stream seconds per real second; None: from `load`
    d_model: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    d_ff: int = 704
    image_size: int = 64
    new_tokens: int = 8
    sink: int | None = 4  # bounded history (None with window None: full history)
    window: int | None = 1024
    sample_every: int = 100  # captions per block
    warmup: int = 150  # captions on a throwaway session; the rate is timed over the last third (history full)
    seed: int = 0
    threads: int = 1

    def __post_init__(self):
        for name in ("frames", "layers", "new_tokens", "sample_every", "warmup", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"LiveBench.{name}={getattr(self, name)}: must be >= 1")
        for name in ("fps", "load"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LiveBench.{name}={getattr(self, name)}: must be > 0")
        if self.speed is not None and not self.speed > 0:
            raise ValueError(f"LiveBench.speed={self.speed}: must be > 0")
        if (self.sink is None) != (self.window is None):
            raise ValueError("LiveBench: sink and window go together (bounded history)")


def _captioner(cfg: LiveBench, model: CasaModel, processor: Processor) -> Captioner:
    history = History(sink=cfg.sink, window=cfg.window) if cfg.sink is not None else None
    stops = tuple(sorted(processor.stop_ids))
    fixed = EndOfTurnBias(token_id=processor.end_of_turn_id, min_tokens=cfg.new_tokens, stop_ids=stops)
    return Captioner(model, processor, sampling=Sampling(max_new_tokens=cfg.new_tokens), processors=(fixed,),
                     history=history, generator=torch.Generator().manual_seed(cfg.seed))


def _pool(cfg: LiveBench, n: int = 16) -> list[np.ndarray]:
    """Frames of a square moving over a gradient (uint8 HxWx3)."""
    s = cfg.image_size
    yy, xx = np.mgrid[:s, :s]
    out = []
    for i in range(n):
        img = np.stack([xx * 255 // s, yy * 255 // s, np.full_like(xx, 40)], -1).astype(np.uint8)
        x = (i * s // n) % (s - s // 4)
        img[s // 4 : s // 2, x : x + s // 4] = (230, 30, 30)
        out.append(img)
    return out


def run(cfg: LiveBench, *, json_path=None, plot_path=None, log=print) -> dict:
    """Run the benchmark; returns (and writes, given the paths) the report."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = ByteTokenizer()
    mcfg = ModelConfig(lm=LMConfig(vocab_size=tok.vocab_size, d_model=cfg.d_model, n_layers=cfg.layers,
                                   n_heads=cfg.heads, n_kv_heads=cfg.kv_heads, d_ff=cfg.d_ff),
                       vision=VisionConfig(image_size=cfg.image_size), fusion=FusionConfig(variant="casa"))
    model = CasaModel(mcfg).eval()
    processor = Processor(tok, mcfg.vision)
    pool = _pool(cfg)
    load_start = os.getloadavg()

    # the caption rate the model sustains: a throwaway session, timed once its history is full
    probe = _captioner(cfg, model, processor)
    times = []
    for i in range(cfg.warmup):
        t0 = time.perf_counter()
        probe.caption(Frame(i / cfg.fps, pool[i % len(pool)]))
        times.append(time.perf_counter() - t0)
    caption_s = statistics.median(times[-max(1, cfg.warmup // 3):])
    sustained = 1.0 / caption_s
    speed = cfg.speed or cfg.load * sustained / cfg.fps
    real_fps = cfg.fps * speed
    del probe
    if log:
        log(f"live: the model sustains {sustained:.1f} captions/s ({caption_s * 1e3:.1f} ms each); the source sends "
            f"{real_fps:.1f} frames/s ({cfg.fps:g} fps x {speed:.1f} accelerated, load {real_fps / sustained:.2f})")

    def camera():
        for i in range(cfg.frames):
            yield Frame(i / cfg.fps, pool[i % len(pool)], f"camera@{i / cfg.fps:.1f}s", 1.0 / cfg.fps)

    captioner = _captioner(cfg, model, processor)
    reader = LiveReader(camera, name="camera", realtime=True, speed=speed)
    stats, block, spent, blocks = LagStats(), [], [], []
    block_dropped, spent_total = 0, 0.0
    reader.start()
    for live in caption_newest(captioner.caption, reader.slot, clock=reader.clock):
        stats.add(live.lag, live.dropped)
        block.append(live.lag)
        spent.append(live.ended - live.started)
        spent_total += spent[-1]
        block_dropped += live.dropped
        if len(block) == cfg.sample_every:
            lags = np.array(block) * 1e3
            blocks.append({
                "captions": stats.captions, "frames": reader.slot.received,
                "stream_s": round(live.frame.time, 2), "real_s": round(live.ended - reader.started, 2),
                "lag_p50_ms": round(float(np.percentile(lags, 50)), 2),
                "lag_p95_ms": round(float(np.percentile(lags, 95)), 2), "lag_max_ms": round(float(lags.max()), 2),
                "drop_rate": round(block_dropped / (len(block) + block_dropped), 4),
                "caption_p50_ms": round(float(np.median(spent)) * 1e3, 2),
                "load": round(real_fps * float(np.mean(spent)), 3),
                "rss_bytes": resident_bytes(), "cache_bytes": captioner.session.cache_bytes(),
                "kv_tokens": captioner.session.kv_tokens()})
            block, spent, block_dropped = [], [], 0
            if log and len(blocks) % 10 == 0:
                b = blocks[-1]
                log(f"live: {b['frames']}/{cfg.frames} frames, lag p95 {b['lag_p95_ms']:.1f} ms, drop rate "
                    f"{b['drop_rate']:.2f} (load {b['load']:.2f}), rss {b['rss_bytes'] / 2**20:.1f} MiB, cache {b['cache_bytes'] / 2**20:.2f} MiB")
    reader.stop()
    summary = stats.summary()
    first, last = (blocks[0], blocks[-1]) if blocks else ({}, {})

    def ratio(key):
        return round(last[key] / first[key], 4) if first.get(key) else None

    summary.update({
        "frames": reader.slot.received, "stream_hours": round(cfg.frames / cfg.fps / 3600, 3),
        "real_seconds": round(reader.clock() - reader.started, 1),
        "lag_frame_intervals": {k: round(v / 1e3 * real_fps, 2) for k, v in summary["lag_ms"].items()},
        "caption_ms_mean": round(spent_total / max(1, stats.captions) * 1e3, 2),
        "load_mean": round(real_fps * spent_total / max(1, stats.captions), 3),
        "rss_first_bytes": first.get("rss_bytes"), "rss_last_bytes": last.get("rss_bytes"),
        "rss_last_first": ratio("rss_bytes"), "rss_max_bytes": max((b["rss_bytes"] or 0 for b in blocks), default=None),
        "cache_first_bytes": first.get("cache_bytes"), "cache_last_bytes": last.get("cache_bytes"),
        "cache_last_first": ratio("cache_bytes"), "kv_tokens_last": last.get("kv_tokens")})
    result = {"bench": "live", "config": asdict(cfg),
              "measured": {"caption_ms": round(caption_s * 1e3, 2), "sustained_captions_per_s": round(sustained, 2),
                           "speed": round(speed, 3), "real_fps": round(real_fps, 2),
                           "load": round(real_fps / sustained, 3)},
              "summary": summary, "blocks": blocks,
              "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "decode": captioner.session.decode,
                          "loadavg_start": load_start, "loadavg_end": os.getloadavg()}}  # the commit: in `provenance`
    if log:
        lag = summary["lag_ms"]
        log(f"live: {summary['captioned']} of {summary['frames']} frames captioned, drop rate "
            f"{summary['drop_rate']:.3f}, lag p50 {lag['p50']} p95 {lag['p95']} max {lag['max']} ms, rss last/first "
            f"{summary['rss_last_first']}, cache last/first {summary['cache_last_first']}")
    write_report(result, json_path, plot=plot, plot_path=plot_path, indent=1, quiet=not log)
    return result


def plot(result: dict, path) -> None:
    """Lag, drop rate, resident memory and cache against stream time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = result["blocks"]
    hours = [b["stream_s"] / 3600 for b in blocks]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for key, label in (("lag_p50_ms", "p50"), ("lag_p95_ms", "p95"), ("lag_max_ms", "max")):
        axes[0].plot(hours, [b[key] for b in blocks], label=label, lw=1)
    axes[0].set_title("lag per block of captions (ms, real)")
    axes[0].set_ylim(bottom=0)
    axes[0].legend()
    axes[1].plot(hours, [100 * b["drop_rate"] for b in blocks], lw=1, label="measured")
    axes[1].plot(hours, [100 * max(0.0, 1 - 1 / b["load"]) for b in blocks], "--", lw=1,
                 label="1 - 1/load (load: real fps x caption time)")
    axes[1].set_title("frames dropped (%)")
    axes[1].set_ylim(0, 100)
    axes[1].legend(loc="upper left", fontsize=8)
    for ax, key, title in ((axes[2], "rss_bytes", "process resident memory (MiB)"),
                           (axes[3], "cache_bytes", "session cache (MiB)")):
        ys = [(b[key] or 0) / 2**20 for b in blocks]
        ax.plot(hours, ys, lw=1)
        ax.set_title(title)
        ax.set_ylim(0, 1.2 * max(ys, default=1))
    for ax in axes:
        ax.set_xlabel("stream time (h)")
        ax.grid(alpha=0.3)
    c, m, s = result["config"], result["measured"], result["summary"]
    history = f"sink {c['sink']} + window {c['window']}" if c["sink"] is not None else "full history"
    fig.suptitle(f"live: {s['frames']:,} frames at {c['fps']:g} fps ({s['stream_hours']:.2f} h of stream) on a clock "
                 f"{m['speed']:.1f}x faster: {m['real_fps']:.1f} frames/s for a model that sustains "
                 f"{m['sustained_captions_per_s']:.1f} captions/s (load {m['load']:.2f}; {s['load_mean']:.2f} on average "
                 f"as the machine's other work came and went)\ncasa d_model {c['d_model']}, {c['layers']} layers, "
                 f"{c['new_tokens']} tokens a caption, {history}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
