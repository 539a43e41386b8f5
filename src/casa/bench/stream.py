"""`casa bench stream`: a long streaming session, turn after turn, per variant.

A turn is one frame of `image_tokens` precomputed image embeddings (so that
the LM side is what is timed), `prompt_tokens` text tokens after it, then
`new_tokens` greedily generated tokens, the last of which is fed back, as in
a chat. Every variant runs the same random-init model size on the same
inputs, each in a fresh subprocess (`isolate`, the default) so that memory
figures do not leak from one variant into the next and a variant that
really runs out of memory is recorded instead of killing the run.

Per turn: `ttft_ms` (frame arrival to first token: image K/V or image
prefill, prompt, sampling), `decode_ms` and `decode_tok_s` (the other
tokens, the last one's feed included), `decode_ms_per_token`,
`bytes_per_token` (weights read by one decoded token plus the cache, see
`bench/bandwidth.py`), `bandwidth_bytes_s` (one-thread streaming reads,
measured in the same worker right before the turn, so that on a shared
machine the bound follows the load), `bound_ms` (the bytes at that
bandwidth) and `bound_ratio` (measured / bound), `kv_tokens` and `cache_bytes`
(`Session.kv_tokens` / `cache_bytes`), `peak_mem_bytes` (the process's peak
resident set during the turn: runtime, weights and session, as a user's
machine pays it; CUDA: the allocator's peak) and `session_mem_bytes` (the
same minus what the process held before the session started: the session's
own cost, activations included).

A variant stops, recorded not crashed, when it exceeds `max_seconds` of
wall-clock time (`limit_hit: "time"`), `max_cache_bytes` of cache
(`"memory"`), or fails to allocate (`oom: true`).

Design decisions:
- The session API is the one users call (`Session.add_image_embeds`,
  `forward_text`), so the benchmark measures what streaming costs, not a
  special path.
- Image embeddings are precomputed: the vision tower's cost is the same for
  every variant and would only blur the comparison of the LM side.
- Two warm-up turns on a throwaway session keep first-call costs (thread
  pools, kernel selection) out of turn 0.
- The JSON report is written atomically (`casa.files.atomic_file`).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from casa.bench.bandwidth import decode_weight_bytes, read_bandwidth
from casa.bench.memory import PeakMemory
from casa.bench.report import write_report
from casa.config import (
    FUSION_VARIANTS,
    FusionConfig,
    LMConfig,
    ModelConfig,
    VisionConfig,
)
from casa.core.layout import History
from casa.core.model import CasaModel
from casa.inference.cache import entry_bytes
from casa.inference.session import Session, cache_dtype_named
from casa.workers import exit_with_parent

__all__ = ["DTYPES", "FIELDS", "StreamBench", "compare", "plot", "run", "run_variant", "summarize"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FIELDS = ("ttft_ms", "decode_tok_s", "decode_ms_per_token", "bound_ratio", "kv_tokens", "cache_bytes", "peak_mem_bytes", "session_mem_bytes")


@dataclass
class StreamBench:
    variants: list[str] = field(default_factory=lambda: ["casa", "ca", "insertion"])
    turns: int = 1000
    image_tokens: int = 256
    new_tokens: int = 8
    prompt_tokens: int = 1
    d_model: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 2
    d_ff: int = 1408
    vocab: int = 264
    max_seconds: float = 300.0  # per variant
    max_cache_bytes: int = 4 << 30
    sink: int | None = None  # bounded history: sink + window
    window: int | None = None
    seed: int = 0
    threads: int | None = 1  # None: torch's default; 1 is stable on a shared machine
    device: str = "cpu"
    dtype: str = "float32"  # the model's (weights, activations and, by default, caches)
    cache_dtype: str = "model"  # "int8": quantized keys/values (`inference.cache`)
    bandwidth_mib: int = 128  # buffer of the streaming-read measurement: far above the CPU caches

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: choose from {list(DTYPES)}")
        cache_dtype_named(self.cache_dtype)  # a bad name is refused here, before any worker starts
        bad = [v for v in self.variants if v not in FUSION_VARIANTS]
        if bad:
            raise ValueError(f"--variants: unknown {bad}; choose from {list(FUSION_VARIANTS)}")
        if self.turns < 1 or self.new_tokens < 1 or self.prompt_tokens < 1:
            raise ValueError("--turns, --new-tokens and --prompt-tokens must be >= 1")
        if (self.sink is None) != (self.window is None):
            raise ValueError("bounded history needs both --sink and --window")
        side = int(round(self.image_tokens**0.5))
        if side * side != self.image_tokens:
            raise ValueError(f"--image-tokens={self.image_tokens}: must be a square (a patch grid)")

    def model_config(self, variant: str) -> ModelConfig:
        side = int(round(self.image_tokens**0.5))
        return ModelConfig(
            lm=LMConfig(vocab_size=self.vocab, d_model=self.d_model, n_layers=self.layers, n_heads=self.heads,
                        n_kv_heads=self.kv_heads, d_ff=self.d_ff),
            # the vision tower is not run (embeds are given); it only fixes the token count
            vision=VisionConfig(image_size=side * 4, patch_size=4, d_model=32, n_layers=1, n_heads=2, d_ff=32),
            fusion=FusionConfig(variant=variant),
        )

    @property
    def history(self) -> History | None:
        return None if self.sink is None else History(sink=self.sink, window=self.window)


# ------------------------------------------------------------------ worker
def _rss() -> int:
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _turn(session: Session, embeds, prompt, new_tokens: int, dev) -> tuple[float, float]:
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    session.add_image_embeds(embeds)
    tok = int(session.forward_text(prompt)[-1].argmax())
    sync()
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        tok = int(session.forward_text([tok])[-1].argmax())
    session.forward_text([tok])  # the last token joins the history
    sync()
    return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3


def run_variant(cfg: StreamBench, variant: str, emit) -> dict:
    """Run one variant; `emit(record)` gets each turn's record as it is done.
    Returns the run's end state: turns done, oom, limit_hit, seconds."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_variant(cfg, variant, emit)
    finally:
        torch.set_num_threads(threads)


def _run_variant(cfg: StreamBench, variant: str, emit) -> dict:
    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = CasaModel(cfg.model_config(variant)).to(dev, DTYPES[cfg.dtype]).eval()
    weight_bytes = decode_weight_bytes(model)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    frame = lambda: torch.randn(cfg.image_tokens, cfg.d_model, generator=g).to(dev)  # noqa: E731
    prompt = torch.randint(0, cfg.vocab, (cfg.prompt_tokens,), generator=g).tolist()
    cache_dtype = cache_dtype_named(cfg.cache_dtype)
    # first-call costs (thread pools, kernels) out of turn 0
    warm = Session(model, history=cfg.history, cache_dtype=cache_dtype)
    for _ in range(2):
        _turn(warm, frame(), prompt, cfg.new_tokens, dev)
    del warm
    gc.collect()
    # measured here, in the worker that decodes, before every turn (CPU; CUDA: not measured)
    read_buffer = torch.ones(cfg.bandwidth_mib * 2**18) if dev.type == "cpu" else None
    bandwidth = read_bandwidth(buffer=read_buffer) if read_buffer is not None else None
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else _rss()
    session = Session(model, history=cfg.history, cache_dtype=cache_dtype)
    state = {"turns": 0, "oom": False, "limit_hit": None, "error": None,
             "bandwidth_bytes_s_start": round(bandwidth) if bandwidth else None,
             "decode_weight_bytes": weight_bytes}
    start = time.perf_counter()
    for i in range(cfg.turns):
        embeds = frame()
        if read_buffer is not None and i:
            bandwidth = read_bandwidth(buffer=read_buffer, repeats=2)
        try:
            before = _rss() if dev.type == "cpu" else torch.cuda.memory_allocated(dev)
            with PeakMemory(dev) as pm:
                ttft, decode = _turn(session, embeds, prompt, cfg.new_tokens, dev)
        except (MemoryError, torch.OutOfMemoryError) as e:
            state.update(oom=True, error=f"{type(e).__name__}: {e}"[:500])
            break
        except RuntimeError as e:
            if "alloc" not in str(e).lower() and "memory" not in str(e).lower():
                raise
            state.update(oom=True, error=f"{type(e).__name__}: {e}"[:500])
            break
        peak = before + (pm.bytes or 0)  # PeakMemory counts above the turn's start
        per_token = decode / cfg.new_tokens
        read = weight_bytes + session.cache_bytes()
        bound = read / bandwidth * 1e3 if bandwidth else None
        emit({"turn": i, "ttft_ms": round(ttft, 3), "decode_ms": round(decode, 3),
              "decode_tok_s": round(cfg.new_tokens / (decode / 1e3), 2) if decode > 0 else None,
              "decode_ms_per_token": round(per_token, 4), "bytes_per_token": read,
              "bandwidth_bytes_s": round(bandwidth) if bandwidth else None,
              "bound_ms": round(bound, 6) if bound else None,
              "bound_ratio": round(per_token / bound, 4) if bound else None,
              "kv_tokens": session.kv_tokens(), "cache_bytes": session.cache_bytes(),
              "peak_mem_bytes": int(peak), "session_mem_bytes": int(max(0, peak - base))})
        state["turns"] = i + 1
        if session.cache_bytes() > cfg.max_cache_bytes:
            state["limit_hit"] = "memory"
            break
        if time.perf_counter() - start > cfg.max_seconds:
            state["limit_hit"] = "time"
            break
    state["seconds"] = round(time.perf_counter() - start, 3)
    state["bandwidth_bytes_s_end"] = round(read_bandwidth(buffer=read_buffer)) if read_buffer is not None else None
    return state


def _child(cfg: dict, variant: str, conn, parent: int) -> None:
    exit_with_parent(parent)  # a turn can take seconds: do not wait for the next send to fail
    try:
        state = run_variant(StreamBench(**cfg), variant, lambda rec: conn.send(("turn", rec)))
        conn.send(("done", state))
    except BaseException:  # noqa: BLE001 - reported to the parent, which records it
        conn.send(("error", traceback.format_exc()[-2000:]))
    finally:
        conn.close()


def _run_isolated(cfg: StreamBench, variant: str, on_turn) -> dict:
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(asdict(cfg), variant, send, os.getpid()), daemon=True)
    proc.start()
    send.close()
    state = None
    while state is None:
        try:
            kind, payload = recv.recv()
        except EOFError:  # the worker died (e.g. killed by the kernel's OOM killer)
            break
        if kind == "turn":
            on_turn(payload)
        elif kind == "done":
            state = payload
        else:
            proc.join()
            raise RuntimeError(f"bench stream: variant {variant!r} failed:\n{payload}")
    proc.join()
    if state is None:
        killed = proc.exitcode is not None and proc.exitcode < 0
        state = {"oom": killed, "limit_hit": None, "error": f"worker exited with code {proc.exitcode}"}
    return state


# ----------------------------------------------------------------- summary
def _mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(cfg: StreamBench, turns: list[dict], state: dict) -> dict:
    n = len(turns)
    k = max(1, n // 10)
    first = {f: _mean(turns[:k], f) for f in FIELDS}
    last = {f: _mean(turns[-k:], f) for f in FIELDS}
    ratio = lambda f: (last[f] / first[f]) if n and first[f] else None  # noqa: E731
    lm = cfg.model_config("casa").lm
    text_per_turn = cfg.prompt_tokens + cfg.new_tokens
    growth = (turns[-1]["cache_bytes"] - turns[0]["cache_bytes"]) / (n - 1) if n > 1 else None
    return {
        "turns": n,
        "oom": bool(state.get("oom")),
        "limit_hit": state.get("limit_hit"),
        "error": state.get("error"),
        "seconds": state.get("seconds"),
        "bandwidth_bytes_s_start": state.get("bandwidth_bytes_s_start"),
        "bandwidth_bytes_s_end": state.get("bandwidth_bytes_s_end"),
        "decode_weight_bytes": state.get("decode_weight_bytes"),
        "first_10pct": first,
        "last_10pct": last,
        "ttft_ratio_last_first": ratio("ttft_ms"),
        "peak_mem_ratio_last_first": ratio("peak_mem_bytes"),
        "session_mem_ratio_last_first": ratio("session_mem_bytes"),
        "cache_growth_bytes_per_turn": growth,
        # what the SA caches grow by per turn if only text enters them
        "text_kv_bytes_per_turn": text_per_turn * cfg.layers * entry_bytes(
            heads=lm.n_kv_heads, width=lm.head_dim, dtype=DTYPES[cfg.dtype], quantized=cfg.cache_dtype == "int8"),
    }


def compare(runs: list[dict], reference: str = "insertion", last: int = 5) -> list[dict]:
    """TTFT of each variant vs `reference` at the last turns the reference reached."""
    by = {r["variant"]: r for r in runs}
    if reference not in by or not by[reference]["turns"]:
        return []
    ref_turns = by[reference]["turns"]
    idx = [t["turn"] for t in ref_turns[-last:]]
    out = []
    for name, r in by.items():
        if name == reference or len(r["turns"]) <= idx[-1]:
            continue
        ref_ms = _mean(ref_turns[-last:], "ttft_ms")
        mine = _mean([r["turns"][i] for i in idx], "ttft_ms")
        out.append({"variant": name, "reference": reference, "turn": idx[-1], "turns_averaged": len(idx),
                    f"{reference}_ttft_ms": ref_ms, "ttft_ms": mine,
                    "speedup": ref_ms / mine if mine else None,
                    f"{reference}_ttft_ms_last_turn": ref_turns[-1]["ttft_ms"],
                    "ttft_ms_at_that_turn": r["turns"][idx[-1]]["ttft_ms"]})
    return out


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(25, 4.5))
    panels = [("ttft_ms", "time to first token (ms)", 1), ("decode_tok_s", "decode (tokens/s)", 1),
              ("bound_ratio", "decode time per token / bandwidth bound", 1),
              ("cache_bytes", "KV cache (MiB)", 2**20), ("peak_mem_bytes", "peak memory of the process (MiB)", 2**20)]
    for ax, (key, title, scale) in zip(axes, panels):
        for run in result["runs"]:
            rows = [t for t in run["turns"] if t.get(key) is not None]
            xs = [t["turn"] for t in rows]
            ys = [t[key] / scale for t in rows]
            (line,) = ax.plot(xs, ys, label=run["variant"], lw=1)
            s = run["summary"]
            if s["oom"] or s["limit_hit"]:
                ax.plot(xs[-1:], ys[-1:], "x", color=line.get_color(), ms=10)
        ax.set_title(title)
        ax.set_xlabel("turn")
        if key == "ttft_ms":
            ax.set_yscale("log")
        if key == "bound_ratio":
            ax.axhline(1.0, color="k", lw=0.8)  # the bound itself
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(title="x = stopped (time / memory limit)")
    c = result["config"]
    cache = "" if c.get("cache_dtype", "model") == "model" else f", {c['cache_dtype']} cache"
    fig.suptitle(f"streaming ({c.get('dtype', 'float32')}{cache}): d_model {c['d_model']}, {c['layers']} layers, "
                 f"{c['image_tokens']} image tokens "
                 f"+ {c['prompt_tokens']}+{c['new_tokens']} text tokens per turn"
                 + (f", history sink {c['sink']} + window {c['window']}" if c.get("sink") is not None else ""))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: StreamBench, *, json_path=None, plot_path=None, isolate: bool = True, log=print) -> dict:
    runs = []
    load_start = os.getloadavg()
    for variant in cfg.variants:
        turns: list[dict] = []
        every = max(1, cfg.turns // 10)

        def on_turn(rec, turns=turns, variant=variant):
            turns.append(rec)
            if log and (rec["turn"] + 1) % every == 0:
                log(f"{variant}: turn {rec['turn'] + 1}/{cfg.turns} ttft {rec['ttft_ms']:.1f} ms, "
                    f"{rec['decode_tok_s']} tok/s, kv {rec['kv_tokens']} tokens, "
                    f"cache {rec['cache_bytes'] / 2**20:.1f} MiB, peak {rec['peak_mem_bytes'] / 2**20:.1f} MiB")

        state = _run_isolated(cfg, variant, on_turn) if isolate else run_variant(cfg, variant, on_turn)
        summary = summarize(cfg, turns, state)
        if log:
            ms = [(summary.get(k) or {}).get("ttft_ms") for k in ("first_10pct", "last_10pct")]
            ms = " -> ".join("?" if m is None else f"{m:.1f}" for m in ms)
            ended = ("out of memory" if summary["oom"] else
                     f"stopped at its {summary['limit_hit']} limit" if summary["limit_hit"] else "done")
            log(f"{variant}: {summary['turns']} turns, time to first token {ms} ms (first / last 10% of turns), "
                f"{ended}")
        runs.append({"variant": variant, "turns": turns, "summary": summary})
    config = {**asdict(cfg), "torch": torch.__version__, "cpu_count": os.cpu_count(),
              "isolate": isolate, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
              "peak_mem_bytes": "process peak RSS during the turn (CUDA: allocator peak)",
              "session_mem_bytes": "peak_mem_bytes minus what the process held before the session started"}
    result = {"config": config, "runs": runs, "compare": compare(runs)}
    write_report(result, json_path, plot=plot, plot_path=plot_path, indent=1, quiet=True)
    return result
