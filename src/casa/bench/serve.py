"""`casa bench serve`: a bounded load test of `casa serve` on the loopback interface.

For each session count (`--sessions`, default 2, 4 and 8), a server started
here with that `--max-sessions` first answers each distinct request alone,
one at a time (the reference replies); then concurrent chat clients send a
fixed number of OpenAI chat completions (text + one image each, greedy), in
two phases:

- `within`: as many clients as the server admits (`max_sessions` running +
  `max_queue` queued), so every request must succeed: zero errors expected;
- `over`: three times as many, so the excess must be refused cleanly (429
  with the OpenAI error body, or 503 after the queue timeout) and nothing
  else may fail. A refused client waits `backoff` seconds before its next
  request, as a client honouring the server's `Retry-After` would (without
  it the refused clients would spend the request budget in a few
  milliseconds).

Per phase: correctness (each successful reply compared with the same
request's reply alone: it must be equal, 100%, whatever ran beside it),
requests/s (successful ones over the phase's wall time), latency p50/p95 of
the successful requests (from sending to the full response) and of the
refusals, status counts, errors (anything but 200/429/503, and any malformed
answer), and the server's resident memory before, at its peak and after the
phase (once idle). The plot shows req/s, p95 and the share of equal replies
against the session count.

Design decisions:
- The server is its own process (`python -m casa.cli serve --port 0`), so its
  memory is measured alone (`/proc/PID/status`: VmRSS, VmHWM reset through
  `clear_refs` before each phase) and the clients do not share its
  interpreter lock. It is stopped at the end, whatever happens.
- Clients are threads using `http.client` from the standard library: nothing
  between the measurement and the wire.
- Bounded: a fixed number of requests per phase, a timeout per request and a
  deadline for the whole run; loopback only (the server binds 127.0.0.1).
- Without `--checkpoint`, a random-init casa model of the given size is saved
  to a temporary directory (the byte tokenizer): what is measured is the
  server and the model's compute, not the model's quality. Its replies are
  16 tokens of noise, and so a sharp test of equality: a reply decoded
  beside others that read or wrote the wrong state diverges at once.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from http.client import HTTPConnection
from pathlib import Path

from casa.bench.report import write_report
from casa.files import check_output_file

__all__ = ["ServeBench", "add_arguments", "main", "run", "run_from_args"]


@dataclass
class ServeBench:
    checkpoint: str | None = None  # None: a random-init model of the size below
    d_model: int = 256
    layers: int = 4
    heads: int = 4
    image_size: int = 64
    variant: str = "casa"
    sessions: tuple[int, ...] = (2, 4, 8)  # a server with each --max-sessions in turn
    max_queue: int = 4
    distinct: int = 8  # distinct requests (images); client k sends request k % distinct
    requests: int = 48  # per phase
    max_tokens: int = 16
    threads: int = 1  # torch threads per session
    request_timeout: float = 120.0
    backoff: float = 0.5  # seconds a refused client waits
    deadline: float = 900.0  # seconds for the whole run
    seed: int = 0

    def __post_init__(self):
        for name in ("d_model", "layers", "heads", "image_size", "max_queue", "distinct", "requests",
                     "max_tokens", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        self.sessions = tuple(self.sessions)
        if not self.sessions or min(self.sessions) < 1:
            raise ValueError(f"--sessions {' '.join(map(str, self.sessions))}: give session counts >= 1")


# ------------------------------------------------------------------ server
def _save_model(cfg: ServeBench, path: Path) -> Path:
    import torch

    from casa.config import FusionConfig, LMConfig, ModelConfig, VisionConfig
    from casa.core.model import CasaModel
    from casa.pretrained.directory import save_pretrained
    from casa.pretrained.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    torch.manual_seed(cfg.seed)
    config = ModelConfig(
        lm=LMConfig(vocab_size=tok.vocab_size, d_model=cfg.d_model, n_layers=cfg.layers, n_heads=cfg.heads,
                    n_kv_heads=max(1, cfg.heads // 2), d_ff=4 * cfg.d_model),
        vision=VisionConfig(image_size=cfg.image_size, patch_size=8, d_model=128, n_layers=2, n_heads=4, d_ff=256),
        fusion=FusionConfig(variant=cfg.variant, placement="parallel"))
    save_pretrained(CasaModel(config), path, tokenizer=tok)
    return path


def _status(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.MULTILINE)}


def _reset_peak(pid: int) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak is since the server started


class _Server:
    """`casa serve` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint: Path, cfg: ServeBench, sessions: int):
        cmd = [sys.executable, "-m", "casa.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0",
               "--model-name", "bench", "--max-sessions", str(sessions), "--max-queue", str(cfg.max_queue),
               "--max-tokens", str(cfg.max_tokens), "--threads", str(cfg.threads), "--log-level", "warning",
               "--queue-timeout", str(cfg.request_timeout)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=120)
        match = re.search(r"http://([\d.]+):(\d+)/", line[0] if line else "")
        if match is None:
            self.stop()
            raise RuntimeError(f"casa serve did not start (printed {line!r}, exit code {self.proc.poll()})")
        self.host, self.port = match.group(1), int(match.group(2))

    def get(self, path: str) -> dict:
        conn = HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.get("/health")
            if health["sessions"] == 0 and health["queued"] == 0:
                time.sleep(0.2)  # the idle hand-back of freed memory runs right after
                return
            time.sleep(0.05)
        raise RuntimeError("the server did not become idle")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ----------------------------------------------------------------- clients
def _payload(seed: int, cfg: ServeBench) -> bytes:
    import numpy as np
    from PIL import Image

    image = np.random.default_rng(seed).integers(0, 256, (cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return json.dumps({"model": "bench", "max_tokens": cfg.max_tokens, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Describe the image."},
                                     {"type": "image_url", "image_url": {"url": url}}]}]}).encode()


def _one_request(server: _Server, body: bytes, timeout: float) -> tuple[int | None, float, str, str | None]:
    """(status or None, seconds, problem or "", the reply's text or None)."""
    t0 = time.perf_counter()
    conn = HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = json.loads(response.read())
        seconds = time.perf_counter() - t0
        if response.status == 200:
            text = data["choices"][0]["message"]["content"]
            ok = text is not None and data["usage"]["completion_tokens"] >= 1
            return 200, seconds, "" if ok else f"malformed answer: {str(data)[:200]}", text
        message = data.get("error", {}).get("message", "")
        return response.status, seconds, "" if message else f"error without a message: {str(data)[:200]}", None
    except Exception as e:  # noqa: BLE001 - every failure is a result here
        return None, time.perf_counter() - t0, f"{type(e).__name__}: {e}", None
    finally:
        conn.close()


def _percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return round(float(np.percentile(values, q)) * 1e3, 2) if values else None


def _references(server: _Server, bodies: list[bytes], cfg: ServeBench) -> list[str]:
    """Each request's reply when it runs alone (one at a time, the server otherwise idle)."""
    replies = []
    for k, body in enumerate(bodies):
        status, _, problem, text = _one_request(server, body, cfg.request_timeout)
        if status != 200 or problem:
            raise RuntimeError(f"request {k} alone: HTTP {status} {problem}")
        replies.append(text)
    return replies


def _phase(server: _Server, cfg: ServeBench, clients: int, deadline: float, references: list[str]) -> dict:
    bodies = [_payload(cfg.seed + k % cfg.distinct, cfg) for k in range(clients)]
    results: list[tuple[int | None, float, str, str | None, int]] = []
    lock = threading.Lock()
    sent = [0]

    def client(k: int) -> None:
        while time.monotonic() < deadline:
            with lock:
                if sent[0] >= cfg.requests:
                    return
                sent[0] += 1
            result = _one_request(server, bodies[k], cfg.request_timeout)
            with lock:
                results.append((*result, k % cfg.distinct))
            if result[0] in (429, 503):
                time.sleep(cfg.backoff)

    server.wait_idle()
    before = _status(server.proc.pid)
    _reset_peak(server.proc.pid)
    t0 = time.perf_counter()
    workers = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    peak = _status(server.proc.pid)["VmHWM"]
    server.wait_idle()
    after = _status(server.proc.pid)
    ok = [s for status, s, problem, _, _ in results if status == 200 and not problem]
    refused = [s for status, s, problem, _, _ in results if status in (429, 503) and not problem]
    errors = [problem or f"HTTP {status}" for status, _, problem, _, _ in results
              if problem or status not in (200, 429, 503)]
    replies = [(text, references[k]) for status, _, problem, text, k in results if status == 200 and not problem]
    differ = [f"got {text!r}, alone {alone!r}" for text, alone in replies if text != alone]
    statuses: dict[str, int] = {}
    for status, *_ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {"clients": clients, "requests": len(results), "wall_s": round(wall, 3), "statuses": statuses,
            "ok": len(ok), "refused": len(refused), "errors": len(errors), "error_examples": errors[:5],
            "compared": len(replies), "equal": len(replies) - len(differ),
            "equal_pct": round(100 * (len(replies) - len(differ)) / len(replies), 2) if replies else None,
            "differ_examples": differ[:3],
            "requests_per_s": round(len(ok) / wall, 3), "latency_p50_ms": _percentile(ok, 50),
            "latency_p95_ms": _percentile(ok, 95), "refusal_p50_ms": _percentile(refused, 50),
            "server_rss_before_bytes": before["VmRSS"], "server_rss_peak_bytes": peak,
            "server_rss_after_bytes": after["VmRSS"]}


def _server_run(checkpoint: Path, cfg: ServeBench, sessions: int, deadline: float) -> dict:
    """One server with `--max-sessions sessions`: the references, then both phases."""
    server = _Server(checkpoint, cfg, sessions)
    try:
        idle = _status(server.proc.pid)["VmRSS"]
        references = _references(server, [_payload(cfg.seed + k, cfg) for k in range(cfg.distinct)], cfg)
        capacity = sessions + cfg.max_queue
        phases = {"within": _phase(server, cfg, capacity, deadline, references),
                  "over": _phase(server, cfg, 3 * capacity, deadline, references)}
    finally:
        server.stop()
    return {"sessions": sessions, "server_rss_idle_bytes": idle, "phases": phases}


def run(cfg: ServeBench, *, json_path=None, plot_path=None) -> dict:
    """Run every session count and return (and write, given `json_path` / `plot_path`) the results."""
    check_output_file(json_path, "--json")
    check_output_file(plot_path, "--plot")
    deadline = time.monotonic() + cfg.deadline
    with tempfile.TemporaryDirectory(prefix="casa-bench-serve-") as tmp:
        checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else _save_model(cfg, Path(tmp) / "model")
        runs = [_server_run(checkpoint, cfg, n, deadline) for n in cfg.sessions]
    result = {"bench": "serve", "config": asdict(cfg), "runs": runs,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_1min": round(os.getloadavg()[0], 2)}}
    write_report(result, json_path, plot=plot, plot_path=plot_path, quiet=True)
    return result


def plot(result: dict, path) -> None:
    """req/s, p95 latency and equal replies against the session count, one line per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    sessions = [r["sessions"] for r in result["runs"]]
    for phase in ("within", "over"):
        rows = [r["phases"][phase] for r in result["runs"]]
        for ax, key in zip(axes, ("requests_per_s", "latency_p95_ms", "equal_pct")):
            ax.plot(sessions, [row[key] for row in rows], marker="o", label=phase)
    for ax, title in zip(axes, ("requests/s", "p95 latency (ms)", "replies equal to alone (%)")):
        ax.set_title(title)
        ax.set_xlabel("--max-sessions")
        ax.set_xticks(sessions)
        ax.legend()
    axes[2].set_ylim(0, 105)
    cfg = result["config"]
    fig.suptitle(f"casa serve on loopback: d_model {cfg['d_model']}, {cfg['layers']} layers, "
                 f"{cfg['max_tokens']} tokens per reply, {cfg['threads']} thread per session, "
                 f"load {result['machine']['load_1min']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `casa bench serve` (and `python -m casa.bench.serve`)."""
    p.add_argument("--json", default="benchmarks/serve.json", help="where to write the results")
    p.add_argument("--plot", default="benchmarks/serve.png", help="PNG of latency, throughput and memory")
    p.add_argument("--checkpoint", default=None, help="a casa model directory (default: a random-init model)")
    defaults = ServeBench()
    p.add_argument("--sessions", type=int, nargs="+", default=list(defaults.sessions),
                   help="--max-sessions of the servers, one after another (default: 2 4 8)")
    helps = {"d_model": "width of the random-init model", "layers": "its decoder blocks", "heads": "its attention heads",
             "image_size": "image side in pixels", "max_queue": "--max-queue of the servers",
             "distinct": "distinct requests (each answered alone first)", "requests": "requests per phase",
             "max_tokens": "greedy tokens per request", "threads": "torch CPU threads per session"}
    for name, text in helps.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name), help=text)
    p.add_argument("--deadline", type=float, default=defaults.deadline, help="seconds for the whole run")
    p.add_argument("--backoff", type=float, default=defaults.backoff, help="seconds a refused client waits")


def run_from_args(args) -> int:
    """Run with parsed `add_arguments` options; print a summary per phase."""
    options = {k: v for k, v in vars(args).items() if k in ServeBench.__dataclass_fields__}
    result = run(ServeBench(**options), json_path=args.json, plot_path=args.plot)
    for r in result["runs"]:
        for name, phase in r["phases"].items():
            print(f"{r['sessions']} sessions, {name:6s} {phase['clients']:3d} clients: equal to alone "
                  f"{phase['equal']}/{phase['compared']}, {phase['requests_per_s']:.2f} req/s, p50 "
                  f"{phase['latency_p50_ms']} ms, p95 {phase['latency_p95_ms']} ms, statuses {phase['statuses']}, "
                  f"errors {phase['errors']}, server RSS peak {phase['server_rss_peak_bytes'] / 2**20:.0f} MiB")
    print(f"wrote {args.json} and {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m casa.bench.serve`: the same as `casa bench serve`, with casa's error convention."""
    p = argparse.ArgumentParser(prog="casa bench serve", description="bounded load test of casa serve on loopback")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"casa: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
