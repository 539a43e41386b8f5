"""`casa bench attention | train | stream | live | batch | eval-decode | serve | paper`: the benchmarks, JSON + plot
each.

Design decisions:
- Sizes and counts are checked by argparse (`positive_int`, ...), the
  output files (`--json`, `--plot`) before anything is measured, so a typo
  never costs a benchmark run.
- The benchmarks themselves live in `casa.bench`; this module only maps
  flags onto them.
"""

from __future__ import annotations

import argparse

from casa.bench.serve import add_arguments as add_serve_arguments
from casa.cli.values import non_negative_int, positive_float, positive_int

__all__ = ["attention", "batch", "eval_decode", "live", "paper", "register", "serve", "stream", "train"]


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    att = bench.add_parser("attention", help="time every attention backend on one packed batch")
    att.add_argument("--json", default="benchmarks/attention.json", help="where to write the results")
    att.add_argument("--plot", default=None, help="optional PNG of the timings")
    att.add_argument("--windows", type=positive_int, default=16, help='windows in the packed batch')
    att.add_argument("--image-tokens", type=positive_int, default=256, help='image tokens per window')
    att.add_argument("--text-tokens", type=positive_int, default=256, help='text tokens per window')
    att.add_argument("--heads", type=positive_int, default=8, help='attention heads')
    att.add_argument("--head-dim", type=positive_int, default=64, help='head dimension')
    att.add_argument("--backends", default=None, help="comma-separated subset (default: all available)")
    att.add_argument("--repeats", type=positive_int, default=5, help='best of this many timings')
    att.set_defaults(func=attention)

    bt = bench.add_parser("train", help="training step: text tokens/s and peak memory per fusion variant")
    bt.add_argument("--json", default="benchmarks/train.json", help='where to write the results')
    bt.add_argument("--variants", default="insertion,ca,casa", help='comma-separated fusion variants')
    bt.add_argument("--text-tokens", type=positive_int, default=512, help='text tokens per pack')
    bt.add_argument("--image-ratio", type=positive_int, default=10, help="image tokens per text token")
    bt.add_argument("--d-model", type=positive_int, default=256, help='model width')
    bt.add_argument("--n-layers", type=positive_int, default=4, help='decoder blocks')
    bt.add_argument("--repeats", type=positive_int, default=3, help='best of this many timed steps')
    bt.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    bt.add_argument("--layout", default="packed", choices=("packed", "interleaved"),
                    help="one document per image (packed samples) or one long document")
    bt.set_defaults(func=train)

    bs = bench.add_parser("stream", help="streaming session: TTFT, decode speed, cache and memory per turn")
    bs.add_argument("--variants", default="casa,ca,insertion",
                    help='comma-separated fusion variants, each in its own process')
    bs.add_argument("--turns", type=positive_int, default=1000,
                    help='turns of the simulated session (one frame, a prompt, a reply each)')
    bs.add_argument("--json", default="benchmarks/stream.json", help='where to write the results')
    bs.add_argument("--plot", default=None, help="PNG of TTFT, cache and memory vs turn")
    bs.add_argument("--image-tokens", type=positive_int, default=256, help='image tokens per frame')
    bs.add_argument("--new-tokens", type=positive_int, default=8, help='generated tokens per turn')
    bs.add_argument("--prompt-tokens", type=positive_int, default=1, help='prompt tokens per turn')
    bs.add_argument("--d-model", type=positive_int, default=512, help='model width')
    bs.add_argument("--layers", type=positive_int, default=8, help='decoder blocks')
    bs.add_argument("--heads", type=positive_int, default=8, help='attention heads')
    bs.add_argument("--kv-heads", type=positive_int, default=2, help='key/value heads')
    bs.add_argument("--d-ff", type=positive_int, default=1408, help='feed-forward width')
    bs.add_argument("--max-seconds", type=positive_float, default=300.0,
                    help="per variant; beyond it the variant stops")
    bs.add_argument("--max-cache-bytes", type=positive_float, default=4 * 2**30,
                    help="per variant; beyond it it stops (default: 4 GiB)")
    bs.add_argument("--sink", type=non_negative_int, default=None, help="bounded history: attention-sink tokens")
    bs.add_argument("--window", type=positive_int, default=None, help="bounded history: sliding-window tokens")
    bs.add_argument("--threads", type=non_negative_int, default=1,
                    help="torch CPU threads (0 = torch's default); 1 keeps timings stable on a shared machine")
    bs.add_argument("--device", default="cpu", help='cpu, cuda or cuda:N')
    bs.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the model's dtype (weights, activations and, by default, caches)")
    bs.add_argument("--cache-dtype", default="model", choices=("model", "int8"),
                    help="key/value caches in the model's dtype, or int8 with a scale per row and head")
    bs.add_argument("--seed", type=int, default=0, help='random seed of the model')
    bs.add_argument("--no-isolate", action="store_true", help="run every variant in this process")
    bs.set_defaults(func=stream)

    bl = bench.add_parser("live", help="a simulated live stream through the live scheduler on an accelerated clock: "
                                       "lag, drops, memory and cache over hours")
    bl.add_argument("--frames", type=positive_int, default=10_000, help="frames the simulated camera sends")
    bl.add_argument("--fps", type=positive_float, default=2.0, help="its frame rate, in stream time")
    bl.add_argument("--load", type=positive_float, default=0.5,
                    help="real frame rate / the caption rate the model sustains (2 = twice what it can keep up with)")
    bl.add_argument("--speed", type=positive_float, default=None, help="clock acceleration (default: from --load)")
    bl.add_argument("--json", default="benchmarks/live.json", help='where to write the results')
    bl.add_argument("--plot", default=None, help="PNG of lag, drops, memory and cache against stream time")
    bl.add_argument("--d-model", type=positive_int, default=256, help='model width')
    bl.add_argument("--layers", type=positive_int, default=4, help='decoder blocks')
    bl.add_argument("--new-tokens", type=positive_int, default=8, help="tokens per caption")
    bl.add_argument("--sink", type=non_negative_int, default=4, help="bounded history: attention-sink tokens")
    bl.add_argument("--window", type=positive_int, default=1024, help="bounded history: sliding-window tokens")
    bl.add_argument("--history", choices=("bounded", "full"), default="bounded",
                    help='bounded (--sink + --window) or full history')
    bl.add_argument("--sample-every", type=positive_int, default=100, help="captions per reported block")
    bl.add_argument("--warmup", type=positive_int, default=150,
                    help="captions before the sustained rate is timed (over the last third)")
    bl.add_argument("--seed", type=int, default=0, help='random seed of the model and the frames')
    bl.set_defaults(func=live)

    bb = bench.add_parser("batch", help="sessions decoded in one batched step vs one at a time, and one session "
                                        "across kernel threads against the bandwidth bound")
    bb.add_argument("--sessions", type=positive_int, nargs="+", default=[1, 2, 4, 8],
                    help='numbers of sessions decoded together')
    bb.add_argument("--contexts", type=positive_int, nargs="+", default=[300, 1500],
                    help="cached text tokens per session (default: 300 1500)")
    bb.add_argument("--new-tokens", type=positive_int, default=32, help="greedy tokens per session and run")
    bb.add_argument("--repeats", type=positive_int, default=3, help="median of, the modes alternating")
    bb.add_argument("--threads", type=positive_int, nargs="+", default=None,
                    help="kernel threads of the cores part (default: 1 .. the CPU count)")
    bb.add_argument("--json", default="benchmarks/batch.json", help='where to write the results')
    bb.add_argument("--plot", default="benchmarks/batch.png", help='PNG of the timings')
    bb.set_defaults(func=batch)

    be = bench.add_parser("eval-decode", help="evaluation decoding: cached batched vs the uncached loop")
    be.add_argument("--variants", default="casa,insertion", help='comma-separated fusion variants')
    be.add_argument("--samples", type=positive_int, default=64, help='prompts decoded')
    be.add_argument("--new-tokens", type=positive_int, default=24, help='tokens per answer')
    be.add_argument("--d-model", type=positive_int, default=128, help='model width')
    be.add_argument("--layers", type=positive_int, default=4, help='decoder blocks')
    be.add_argument("--repeats", type=positive_int, default=3, help="best of, each decoder, alternating")
    be.add_argument("--threads", type=non_negative_int, default=1, help="torch CPU threads (0 = torch's default)")
    be.add_argument("--json", default="benchmarks/eval_decode.json", help='where to write the results')
    be.add_argument("--plot", default=None, help="PNG of the timings")
    be.set_defaults(func=eval_decode)

    bv = bench.add_parser("serve", help="bounded load test of casa serve on loopback: req/s, latency, 429s, memory")
    add_serve_arguments(bv)
    bv.set_defaults(func=serve)

    bp = bench.add_parser("paper", help="the paper's cost table at its model shapes (random weights; GPU)")
    bp.add_argument("--preset", default="qwen2.5-vl-3b", choices=("qwen2.5-vl-3b", "helium-1-2b", "tiny"),
                    help="LM shape: Qwen2.5-VL-3B's or Helium-1-2B's (tiny: a toy shape for CPU)")
    bp.add_argument("--out-dir", default="benchmarks/gpu", help="where the JSON and plots go")
    bp.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    bp.add_argument("--parts", default="train,stream", help="train, stream or both")
    bp.add_argument("--variants", default="insertion,ca,casa", help='comma-separated fusion variants')
    bp.add_argument("--repeats", type=positive_int, default=3, help='best of this many timed training steps')
    bp.add_argument("--max-seconds", type=positive_float, default=1800.0, help="per streaming variant")
    bp.set_defaults(func=paper)


def _check_outputs(args) -> None:
    from casa.files import check_distinct, check_output_file

    check_output_file(args.json, "--json")
    check_output_file(getattr(args, "plot", None), "--plot")
    check_distinct(**{"--json": args.json, "--plot": getattr(args, "plot", None)})


def attention(args) -> int:
    from casa.bench.attention import run

    _check_outputs(args)
    run(json_path=args.json, windows=args.windows, image_tokens=args.image_tokens,
        text_tokens=args.text_tokens, heads=args.heads, head_dim=args.head_dim,
        backends=args.backends.split(",") if args.backends else None, repeats=args.repeats,
        plot_path=args.plot)
    return 0


def train(args) -> int:
    from casa.bench.train import run

    _check_outputs(args)
    run(json_path=args.json, variants=[v.strip() for v in args.variants.split(",")], text_tokens=args.text_tokens,
        image_ratio=args.image_ratio, repeats=args.repeats, d_model=args.d_model, n_layers=args.n_layers,
        threads=args.threads, layout=args.layout)
    return 0


def stream(args) -> int:
    from casa.bench.stream import StreamBench, run

    _check_outputs(args)
    cfg = StreamBench(variants=[v.strip() for v in args.variants.split(",")], turns=args.turns,
                      image_tokens=args.image_tokens, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                      d_model=args.d_model,
                      layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, d_ff=args.d_ff,
                      max_seconds=args.max_seconds, max_cache_bytes=int(args.max_cache_bytes), sink=args.sink,
                      window=args.window, seed=args.seed, threads=args.threads or None, device=args.device,
                      dtype=args.dtype, cache_dtype=args.cache_dtype)
    run(cfg, json_path=args.json, plot_path=args.plot, isolate=not args.no_isolate)
    return 0


def live(args) -> int:
    from casa.bench.live import LiveBench, run

    _check_outputs(args)
    full = args.history == "full"
    cfg = LiveBench(frames=args.frames, fps=args.fps, load=args.load, speed=args.speed, d_model=args.d_model,
                    layers=args.layers, new_tokens=args.new_tokens, sink=None if full else args.sink,
                    window=None if full else args.window, sample_every=args.sample_every, warmup=args.warmup,
                    seed=args.seed)
    run(cfg, json_path=args.json, plot_path=args.plot)
    return 0


def batch(args) -> int:
    from casa.bench.batch import BatchBench, run

    _check_outputs(args)
    cfg = BatchBench(sessions=tuple(args.sessions), contexts=tuple(args.contexts), new_tokens=args.new_tokens,
                     repeats=args.repeats, threads=None if args.threads is None else tuple(args.threads))
    run(cfg, json_path=args.json, plot_path=args.plot)
    return 0


def eval_decode(args) -> int:
    from casa.bench.eval_decode import EvalDecodeBench, run

    _check_outputs(args)
    cfg = EvalDecodeBench(variants=[v.strip() for v in args.variants.split(",")], samples=args.samples,
                          new_tokens=args.new_tokens, d_model=args.d_model, layers=args.layers,
                          threads=args.threads or None, repeats=args.repeats)
    run(cfg, json_path=args.json, plot_path=args.plot)
    return 0


def paper(args) -> int:
    from casa.files import check_output_dir

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - {"train", "stream"}:
        raise ValueError(f"--parts {args.parts!r}: expected train, stream or train,stream")
    check_output_dir(args.out_dir, "--out-dir")
    from casa.bench.paper import run

    run(args.preset, out_dir=args.out_dir, device=args.device, parts=parts, repeats=args.repeats,
        variants=[v.strip() for v in args.variants.split(",")], max_seconds=args.max_seconds)
    return 0


def serve(args) -> int:
    from casa.bench.serve import run_from_args

    return run_from_args(args)
