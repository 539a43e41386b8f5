"""`casa bench batch`: many streams for the price of one, and one stream over several cores.

Two measurements on the bench model (`bench stream`'s: casa, d_model 512,
8 layers, fp32), in one process, on the kernel decode path:

- **Sessions:** N sessions (1, 2, 4, 8), each prefilled with one image and a
  text context (short: a few hundred cached tokens; long: a few thousand),
  then decoding `new_tokens` greedy tokens each, either one session after
  another at every step (`alone`: `forward_text` per session) or in one
  batched step (`batched`: `Session.forward_tokens`, the weights read once
  for all), both with the kernels on one thread, and batched with the
  kernels on every core (`batched_all_cores`). Reported: aggregate
  tokens/s, the time of one step (every session's next token: its per-token
  latency), the ratio batched / alone, and whether every session's tokens
  are equal in every mode.
- **Cores:** one session's time per token with the kernels on 1, 2, ...
  threads, against the bandwidth bound measured with as many threads
  (`bench.bandwidth`: weights + cache bytes / streaming read rate).

Design decisions:
- The modes alternate, repeat by repeat, on clones of the same prefilled
  sessions, so both see the same caches and the same machine load; the
  median repeat is reported, with the load beside it.
- A step's cost is the weights (once per step when batched, once per session
  alone) plus each session's own cache reads, which batching does not share:
  the long contexts show how far that bounds the gain.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from casa.bench.bandwidth import decode_weight_bytes, read_bandwidth
from casa.bench.report import write_report
from casa.bench.stream import StreamBench
from casa.core import cpu_kernels
from casa.core.model import CasaModel
from casa.files import check_output_file
from casa.inference.session import Session

__all__ = ["BatchBench", "plot", "run"]


@dataclass
class BatchBench:
    sessions: tuple[int, ...] = (1, 2, 4, 8)
    contexts: tuple[int, ...] = (300, 1500)  # cached text tokens per session (short, long)
    new_tokens: int = 32
    repeats: int = 3
    threads: tuple[int, ...] | None = None  # kernel threads for the cores part (default: 1 .. cores)
    image_tokens: int = 256
    d_model: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 2
    d_ff: int = 1408
    vocab: int = 264
    seed: int = 0

    def __post_init__(self):
        self.sessions, self.contexts = tuple(self.sessions), tuple(self.contexts)
        if not self.sessions or min(self.sessions) < 1 or not self.contexts or min(self.contexts) < 1:
            raise ValueError("--sessions and --contexts: give counts >= 1")
        if self.new_tokens < 2 or self.repeats < 1:
            raise ValueError("--new-tokens must be >= 2 and --repeats >= 1")
        if self.threads is None:
            self.threads = tuple(range(1, (os.cpu_count() or 1) + 1))
        self.threads = tuple(self.threads)
        if min(self.threads) < 1:
            raise ValueError(f"--threads {self.threads}: counts >= 1")

    def model(self) -> CasaModel:
        """The bench model, built as `bench stream` builds it (its `model_config`) at this shape."""
        torch.manual_seed(self.seed)
        shape = StreamBench(variants=["casa"], image_tokens=self.image_tokens, d_model=self.d_model,
                            layers=self.layers, heads=self.heads, kv_heads=self.kv_heads, d_ff=self.d_ff,
                            vocab=self.vocab)
        return CasaModel(shape.model_config("casa")).eval()


def _prefilled(model: CasaModel, cfg: BatchBench, n: int, context: int) -> list[Session]:
    """`n` sessions, each with one image and `context` text tokens of its own."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    sessions = []
    for _ in range(n):
        s = Session(model, decode="kernels")
        s.add_image_embeds(torch.randn(cfg.image_tokens, cfg.d_model, generator=g))
        s.forward_text(torch.randint(0, cfg.vocab, (context,), generator=g))
        sessions.append(s)
    return sessions


def _clone(session: Session) -> Session:
    """A copy of `session`'s state over the same model (its caches copied, its plan rebuilt)."""
    twin = copy.copy(session)
    twin.sa = [copy.deepcopy(c) for c in session.sa]
    twin.windows = [copy.deepcopy(w) for w in session.windows]
    twin.stream = copy.deepcopy(session.stream)
    twin._block_steps = None
    return twin


@torch.inference_mode()
def _decode(sessions: list[Session], new_tokens: int, batched: bool) -> tuple[float, list[list[int]]]:
    """Seconds for `new_tokens` greedy steps of every session (the first step, which builds the
    sessions' plans, is not timed), and each session's tokens."""
    tokens = [[int(s.last_logits.argmax())] for s in sessions]
    t0 = 0.0
    for step in range(new_tokens):
        if step == 1:
            t0 = time.perf_counter()
        last = [t[-1] for t in tokens]
        if batched:
            out = Session.forward_tokens(sessions, last)
        else:
            out = [s.forward_text([i])[-1] for s, i in zip(sessions, last)]
        for t, logits in zip(tokens, out):
            t.append(int(logits.argmax()))
    return time.perf_counter() - t0, tokens


def _sessions_part(model: CasaModel, cfg: BatchBench, log) -> list[dict]:
    rows = []
    steps = cfg.new_tokens - 1  # timed steps
    for context in cfg.contexts:
        for n in cfg.sessions:
            base = _prefilled(model, cfg, n, context)
            modes = ("alone", "batched") + (("batched_all_cores",) if max(cfg.threads) > 1 else ())
            seconds = {mode: [] for mode in modes}
            equal = True
            for _ in range(cfg.repeats):
                got = {}
                for mode in modes:  # alternated: the same load for all
                    cpu_kernels.set_threads(max(cfg.threads) if mode == "batched_all_cores" else 1)
                    wall, got[mode] = _decode([_clone(s) for s in base], cfg.new_tokens, mode != "alone")
                    seconds[mode].append(wall)
                cpu_kernels.set_threads(1)
                equal &= all(got[mode] == got["alone"] for mode in modes)
            row = {"context": context, "sessions": n, "equal_tokens": equal,
                   "load_1min": round(os.getloadavg()[0], 2)}
            for mode, walls in seconds.items():
                wall = statistics.median(walls)
                row[mode] = {"tokens_per_s": round(n * steps / wall, 1), "step_ms": round(1e3 * wall / steps, 2)}
            row["speedup"] = round(row["batched"]["tokens_per_s"] / row["alone"]["tokens_per_s"], 2)
            rows.append(row)
            cores = row.get("batched_all_cores")
            log(f"context {context:5d}, {n} sessions: alone {row['alone']['tokens_per_s']:7.1f} tok/s, batched "
                f"{row['batched']['tokens_per_s']:7.1f} tok/s ({row['speedup']:.2f}x), step "
                f"{row['batched']['step_ms']:.1f} ms" + (f"; on every core {cores['tokens_per_s']:7.1f} tok/s, step "
                                                         f"{cores['step_ms']:.1f} ms" if cores else "")
                + f", equal tokens {equal}")
    one = {r["context"]: r["alone"]["tokens_per_s"] for r in rows if r["sessions"] == 1}
    one_all = {r["context"]: r.get("batched_all_cores", r["alone"])["tokens_per_s"] for r in rows
               if r["sessions"] == 1}
    for r in rows:  # against one session decoding alone on one thread, and on every core
        if r["context"] in one:
            r["batched_vs_one_session"] = round(r["batched"]["tokens_per_s"] / one[r["context"]], 2)
            if "batched_all_cores" in r:
                r["all_cores_vs_one_session_all_cores"] = round(
                    r["batched_all_cores"]["tokens_per_s"] / one_all[r["context"]], 2)
    return rows


def _cores_part(model: CasaModel, cfg: BatchBench, log) -> list[dict]:
    rows = []
    session = _prefilled(model, cfg, 1, cfg.contexts[0])[0]
    weights = decode_weight_bytes(model)
    buffer = torch.ones(128 * 2**18)
    torch_threads = torch.get_num_threads()
    try:
        for n in cfg.threads:
            torch.set_num_threads(n)
            cpu_kernels.set_threads(n)
            walls = []
            bandwidths = []
            for _ in range(cfg.repeats):
                bandwidths.append(read_bandwidth(buffer=buffer, repeats=3))
                walls.append(_decode([_clone(session)], cfg.new_tokens, batched=False)[0])
            ms = 1e3 * statistics.median(walls) / (cfg.new_tokens - 1)
            bandwidth = statistics.median(bandwidths)
            bound = 1e3 * (weights + session.cache_bytes()) / bandwidth
            rows.append({"threads": n, "ms_per_token": round(ms, 3), "bandwidth_bytes_s": round(bandwidth),
                         "bound_ms": round(bound, 3), "bound_ratio": round(ms / bound, 2),
                         "load_1min": round(os.getloadavg()[0], 2)})
            log(f"{n} thread(s): {ms:.2f} ms per token, bound {bound:.2f} ms ({ms / bound:.2f}x), "
                f"read {bandwidth / 1e9:.1f} GB/s")
    finally:
        torch.set_num_threads(torch_threads)
        cpu_kernels.set_threads(1)
    base = rows[0]["ms_per_token"]
    for r in rows:
        r["speedup"] = round(base / r["ms_per_token"], 2)
    return rows


def run(cfg: BatchBench, *, json_path=None, plot_path=None, log=print) -> dict:
    """Both parts at one torch thread (prefill included); returns (and writes) the results."""
    check_output_file(json_path, "--json")
    check_output_file(plot_path, "--plot")
    if not cpu_kernels.available():
        raise ValueError("casa bench batch measures casa's CPU kernels, which are not built here (no C compiler)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu_kernels.set_threads(1)
    try:
        model = cfg.model()
        start = os.getloadavg()
        result = {"bench": "batch", "config": asdict(cfg),
                  "sessions": _sessions_part(model, cfg, log), "cores": _cores_part(model, cfg, log),
                  "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                              "openmp": cpu_kernels.openmp(), "loadavg_start": start, "loadavg_end": os.getloadavg()}}
    finally:
        torch.set_num_threads(threads)
    write_report(result, json_path, plot=plot, plot_path=plot_path)
    return result


def plot(result: dict, path) -> None:
    """Aggregate tokens/s against sessions (alone / batched, per context), and ms per token
    against kernel threads beside the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 5))
    for context in result["config"]["contexts"]:
        rows = [r for r in result["sessions"] if r["context"] == context]
        n = [r["sessions"] for r in rows]
        for mode, style in (("alone", "--"), ("batched", "-"), ("batched_all_cores", ":")):
            if mode in rows[0]:
                ax.plot(n, [r[mode]["tokens_per_s"] for r in rows], style, marker="o",
                        label=f"{mode.replace('_', ' ')}, {context} cached tokens")
    ax.set_xlabel("sessions")
    ax.set_ylabel("decoded tokens/s (all sessions)")
    ax.set_xticks(result["config"]["sessions"])
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: never over the data
    ax.set_title("one step for all sessions vs one session at a time")
    cores = result["cores"]
    t = [r["threads"] for r in cores]
    bx.plot(t, [r["ms_per_token"] for r in cores], marker="o", label="measured")
    bx.plot(t, [r["bound_ms"] for r in cores], "--", marker="x", label="bandwidth bound (same threads)")
    bx.set_xlabel("kernel threads")
    bx.set_ylabel("ms per token (one session)")
    bx.set_xticks(t)
    bx.set_ylim(bottom=0)
    bx.legend(fontsize=8)
    bx.set_title("one session across cores")
    load = result["machine"]["loadavg_start"][0]
    fig.suptitle(f"casa bench batch: casa, d_model {result['config']['d_model']}, {result['config']['layers']} "
                 f"layers, fp32, {result['machine']['cpus']} CPUs, load {load:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
