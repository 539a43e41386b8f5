"""The `casa` command. Each subcommand lives in its own module; this file only
parses arguments and dispatches, importing heavy modules lazily."""

from __future__ import annotations

import argparse
import sys


def _bench_attention(args) -> int:
    from .bench.attention import run

    run(json_path=args.json, windows=args.windows, image_tokens=args.image_tokens,
        text_tokens=args.text_tokens, heads=args.heads, head_dim=args.head_dim,
        backends=args.backends.split(",") if args.backends else None, repeats=args.repeats,
        plot_path=args.plot)
    return 0

def _train(args) -> int:
    from .train import load_config, train

    model_cfg, cfg = load_config(args.config, args.set)
    if args.skip_bad_samples:
        cfg.skip_bad_samples = True
    resume = args.resume if args.resume not in (None, "latest") else (args.resume == "latest" or None)
    summary = train(model_cfg, cfg, resume=resume, quiet=args.quiet)
    if summary.get("checkpoint"):
        print(f"checkpoint: {summary['checkpoint']}")
    if summary.get("skipped"):
        print(f"skipped {summary['skipped']} bad samples")
    return 130 if summary.get("interrupted") == "SIGINT" else 143 if summary.get("interrupted") else 0


def _eval(args) -> int:
    if args.bench:
        if not args.root:
            raise ValueError("--bench needs --root, the directory of the local benchmark copy")
        from .stdbench import run as run_benchmark

        run_benchmark(args.checkpoint, args.bench, args.root, split=args.split, limit=args.limit,
                      json_path=args.json, backend=args.backend)
        return 0
    from .evaluate import run

    run(args.checkpoint, tasks=args.task.split(",") if args.task else None, data=args.data, n=args.n,
        seed=args.seed, difficulty=_key_values(args.difficulty), blind=args.blind, json_path=args.json,
        backend=args.backend, skip_bad=args.skip_bad_samples)
    return 0


def _demo(args) -> int:
    from .demo import run

    run(out=args.out, retrain=args.retrain, steps=args.steps, eval_n=args.eval_n, seed=args.seed)
    return 0


def _data_export(args) -> int:
    from .data import make_sample, write_jsonl
    from .data.tasks import difficulty

    d = difficulty(_key_values(args.difficulty))
    samples = [make_sample(args.task, args.seed, i, d) for i in range(args.n)]
    path = write_jsonl(samples, args.dir, name=f"{args.task}.jsonl")
    print(f"wrote {args.n} samples to {path}")
    return 0


def _bench_train(args) -> int:
    from .bench.train import run

    run(json_path=args.json, variants=args.variants.split(","), text_tokens=args.text_tokens,
        image_ratio=args.image_ratio, repeats=args.repeats, d_model=args.d_model, n_layers=args.n_layers,
        threads=args.threads, layout=args.layout)
    return 0


def _key_values(items) -> dict:
    import json

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: expected key=value")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _add_train_commands(sub, bench) -> None:
    """`train`, `eval`, `demo`, `data export` and `bench train`."""
    tr = sub.add_parser("train", help="train a model (works under torchrun: DDP or FSDP2)")
    tr.add_argument("--config", default=None, help="JSON or TOML file with 'model' and 'train' sections")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override, e.g. train.steps=100 or model.lm.d_model=64 (repeatable)")
    tr.add_argument("--resume", nargs="?", const="latest", default=None,
                    help="continue from the latest checkpoint of out_dir (or from the given checkpoint)")
    tr.add_argument("--skip-bad-samples", action="store_true", help="count and skip bad samples instead of failing")
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint with greedy decoding")
    ev.add_argument("--checkpoint", required=True, help="model directory or run directory (latest checkpoint)")
    ev.add_argument("--task", default=None, help="comma-separated synthetic tasks (default: the training tasks)")
    ev.add_argument("--data", default=None, help="a JSONL file instead of synthetic tasks")
    ev.add_argument("--n", type=int, default=64, help="samples per synthetic task")
    ev.add_argument("--seed", type=int, default=None)
    ev.add_argument("--difficulty", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--blind", action="store_true", help="withhold the images")
    ev.add_argument("--json", default=None, help="output file (default: CHECKPOINT/eval.json)")
    ev.add_argument("--backend", default="auto")
    ev.add_argument("--skip-bad-samples", action="store_true")
    ev.add_argument("--bench", default=None, choices=["chartqa", "docvqa", "infovqa", "textvqa", "ai2d", "gqa"],
                    help="a standard benchmark stored locally (needs --root) instead of synthetic tasks")
    ev.add_argument("--root", default=None, help="directory of the local benchmark copy (parquet or JSON layout)")
    ev.add_argument("--split", default=None)
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    ev.set_defaults(func=_eval)

    de = sub.add_parser("demo", help="train a small CASA model on the synthetic suite and show what it sees")
    de.add_argument("--out", default="runs/demo")
    de.add_argument("--retrain", action="store_true", help="train again even if the run has a checkpoint")
    de.add_argument("--steps", type=int, default=None)
    de.add_argument("--eval-n", type=int, default=None, help="evaluation samples per task")
    de.add_argument("--seed", type=int, default=0)
    de.set_defaults(func=_demo)

    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data", required=True)
    ex = data.add_parser("export", help="write a synthetic task as JSONL + PNG files")
    ex.add_argument("--task", required=True)
    ex.add_argument("--n", type=int, default=100)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--difficulty", action="append", default=[], metavar="KEY=VALUE")
    ex.add_argument("dir")
    ex.set_defaults(func=_data_export)

    bt = bench.add_parser("train", help="training step: text tokens/s and peak memory per fusion variant")
    bt.add_argument("--json", default="benchmarks/train.json")
    bt.add_argument("--variants", default="insertion,ca,casa")
    bt.add_argument("--text-tokens", type=int, default=512)
    bt.add_argument("--image-ratio", type=int, default=10, help="image tokens per text token")
    bt.add_argument("--d-model", type=int, default=256)
    bt.add_argument("--n-layers", type=int, default=4)
    bt.add_argument("--repeats", type=int, default=3)
    bt.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    bt.add_argument("--layout", default="packed", choices=("packed", "interleaved"),
                    help="one document per image (packed samples) or one long document")
    bt.set_defaults(func=_bench_train)


def _caption(args) -> int:
    from .cache import History
    from .generate import EndOfTurnBias, RepetitionPenalty, Sampling
    from .stream import caption_file

    if (args.sink is None) != (args.window is None):
        raise ValueError("--sink and --window go together (bounded history)")
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p)

    def processors(tok):
        out = []
        if args.repetition_penalty > 1:
            out.append(RepetitionPenalty(penalty=args.repetition_penalty, window=args.repetition_window,
                                         ignore=(tok.token_id("<|end|>"), tok.eos_id)))
        if args.end_bias or args.end_slope or args.min_new_tokens:
            out.append(EndOfTurnBias(token_id=tok.token_id("<|end|>"), bias=args.end_bias, slope=args.end_slope,
                                     min_tokens=args.min_new_tokens))
        if args.min_new_tokens:
            out.append(EndOfTurnBias(token_id=tok.eos_id, min_tokens=args.min_new_tokens))
        return out

    def show(cap):
        if not args.quiet:
            print(f"[{cap.time:8.3f}s] {cap.text}  (ttft {cap.ttft_ms:.1f} ms, "
                  f"cache {cap.cache_bytes / 2**20:.2f} MiB)", flush=True)

    history = History(sink=args.sink, window=args.window) if args.sink is not None else None
    n = caption_file(args.video, checkpoint=args.checkpoint, fps=args.fps, srt=args.srt, jsonl=args.jsonl,
                     sampling=sampling, processors_fn=processors, history=history, instruction=args.instruction,
                     allow_size_change=args.allow_size_change, on_caption=show, seed=args.seed)
    print(f"captioned {n} frames" + "".join(f"; wrote {p}" for p in (args.srt, args.jsonl) if p), file=sys.stderr)
    return 0


def _bench_stream(args) -> int:
    from .bench.stream import StreamBench, run

    cfg = StreamBench(variants=args.variants.split(","), turns=args.turns, image_tokens=args.image_tokens,
                      new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, d_model=args.d_model,
                      layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, d_ff=args.d_ff,
                      max_seconds=args.max_seconds, max_cache_bytes=int(args.max_cache_bytes), sink=args.sink,
                      window=args.window, seed=args.seed, threads=args.threads or None, device=args.device)
    run(cfg, json_path=args.json, plot_path=args.plot, isolate=not args.no_isolate)
    return 0


def _add_stream_commands(sub, bench) -> None:
    """`caption` and `bench stream`."""
    cap = sub.add_parser("caption", help="caption a video file or image folder, frame by frame, live")
    cap.add_argument("video", help="a video file (decoded with PyAV) or a folder of images")
    cap.add_argument("--checkpoint", required=True, help="a casa model directory, or a training run (its latest checkpoint)")
    cap.add_argument("--fps", type=float, default=None,
                     help="frames per second to caption (video: default every frame; folder: default 1)")
    cap.add_argument("--srt", default=None, help="SRT file, valid after every frame")
    cap.add_argument("--jsonl", default=None, help="JSONL file, one line per frame")
    cap.add_argument("--max-new-tokens", type=int, default=16)
    cap.add_argument("--min-new-tokens", type=int, default=0, help="no end token before this many tokens")
    cap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    cap.add_argument("--top-k", type=int, default=0)
    cap.add_argument("--top-p", type=float, default=1.0)
    cap.add_argument("--repetition-penalty", type=float, default=1.0, help="over the last tokens, across frames")
    cap.add_argument("--repetition-window", type=int, default=64)
    cap.add_argument("--end-bias", type=float, default=0.0, help="added to the end token's logit")
    cap.add_argument("--end-slope", type=float, default=0.0, help="added to it per generated token")
    cap.add_argument("--sink", type=int, default=None, help="bounded history: attention-sink tokens")
    cap.add_argument("--window", type=int, default=None, help="bounded history: sliding-window tokens")
    cap.add_argument("--instruction", default="Caption each frame.", help="user text with the first frame")
    cap.add_argument("--allow-size-change", action="store_true", help="accept frames of varying sizes")
    cap.add_argument("--seed", type=int, default=0)
    cap.add_argument("--quiet", action="store_true")
    cap.set_defaults(func=_caption)

    bs = bench.add_parser("stream", help="streaming session: TTFT, decode speed, cache and memory per turn")
    bs.add_argument("--variants", default="casa,ca,insertion")
    bs.add_argument("--turns", type=int, default=1000)
    bs.add_argument("--json", default="benchmarks/stream.json")
    bs.add_argument("--plot", default=None, help="PNG of TTFT, cache and memory vs turn")
    bs.add_argument("--image-tokens", type=int, default=256)
    bs.add_argument("--new-tokens", type=int, default=8)
    bs.add_argument("--prompt-tokens", type=int, default=1)
    bs.add_argument("--d-model", type=int, default=512)
    bs.add_argument("--layers", type=int, default=8)
    bs.add_argument("--heads", type=int, default=8)
    bs.add_argument("--kv-heads", type=int, default=2)
    bs.add_argument("--d-ff", type=int, default=1408)
    bs.add_argument("--max-seconds", type=float, default=300.0, help="per variant; beyond it the variant stops")
    bs.add_argument("--max-cache-bytes", type=float, default=4 * 2**30, help="per variant; beyond it it stops")
    bs.add_argument("--sink", type=int, default=None, help="bounded history: attention-sink tokens")
    bs.add_argument("--window", type=int, default=None, help="bounded history: sliding-window tokens")
    bs.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0 = torch's default); 1 keeps timings stable on a shared machine")
    bs.add_argument("--device", default="cpu")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--no-isolate", action="store_true", help="run every variant in this process")
    bs.set_defaults(func=_bench_stream)


def _build(args) -> int:
    from .build import BuildConfig, run

    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    cfg = BuildConfig(lm=args.lm, vision=args.vision, fusion=args.fusion, placement=args.placement, every=args.every,
                      layers=layers, init_from_sa=not args.no_init_from_sa, freeze_lm=not args.train_lm,
                      vision_trainable_blocks=args.vision_trainable_blocks, dtype=args.dtype,
                      token_reduction=args.token_reduction, reduction_factor=args.reduction_factor,
                      image_size=args.image_size, tokenizer=args.tokenizer, image_prefix=args.image_prefix,
                      gist_token=args.gist_token, gist=not args.no_gist)
    run(cfg, args.out, max_shard_size=args.max_shard_size)
    return 0


def _add_build_command(sub) -> None:
    """`build`: a CASA VLM from a local HF causal LM + vision encoder."""
    b = sub.add_parser("build", help="build a CASA VLM from a local HF LM and vision encoder directory")
    b.add_argument("--lm", required=True, help="HF causal-LM directory (Llama, Qwen2, Mistral, Qwen2.5-VL)")
    b.add_argument("--vision", default=None,
                   help="SigLIP / CLIP (vision) or Qwen2.5-VL directory (default: the built-in ViT, from scratch)")
    b.add_argument("--out", required=True, help="casa model directory to write")
    b.add_argument("--fusion", default="casa", help="fusion variant (casa, casa_shared, ca, insertion, ...)")
    b.add_argument("--placement", default="parallel", choices=["parallel", "before", "replace"])
    b.add_argument("--every", type=int, default=1, help="a fusion layer in every n-th block")
    b.add_argument("--layers", default=None, help="explicit comma-separated fusion blocks (wins over --every)")
    b.add_argument("--no-init-from-sa", action="store_true", help="fresh fusion layers instead of SA copies")
    b.add_argument("--train-lm", action="store_true", help="keep the LM trainable (default: frozen)")
    b.add_argument("--vision-trainable-blocks", type=int, default=2,
                   help="train the last k vision blocks (-1: the whole encoder)")
    b.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the LM checkpoint's)")
    b.add_argument("--token-reduction", default="none", choices=["none", "pool", "unshuffle"])
    b.add_argument("--reduction-factor", type=int, default=2)
    b.add_argument("--image-size", type=int, default=None, help="input side (Qwen2.5-VL: a multiple of 28)")
    b.add_argument("--tokenizer", default="lm", help="'lm' (the LM directory's), 'byte', or a tokenizer directory")
    b.add_argument("--image-prefix", default=None, help="token before each image (default: from the template)")
    b.add_argument("--gist-token", default=None, help="token after each image (default: from the template)")
    b.add_argument("--no-gist", action="store_true", help="no token after images")
    b.add_argument("--max-shard-size", default="2GB", help="shard model.safetensors above this size")
    b.set_defaults(func=_build)


def _study(args) -> int:
    from .study import StudyConfig, run

    run(StudyConfig(out=args.out, size="quick" if args.quick else "full", seeds=args.seeds, steps=args.steps,
                    threads=args.threads, docs=args.docs,
                    **({"variants": args.variants.split(",")} if args.variants else {})))
    return 0


def _add_study_command(sub) -> None:
    st = sub.add_parser("study", help="train and compare every fusion variant (the paper's comparison, small)")
    st.add_argument("--out", default="runs/study", help="directory for results.json, report.md and plots")
    st.add_argument("--quick", action="store_true", help="tiny model, 1 seed, a few minutes (CI)")
    st.add_argument("--seeds", type=int, default=None, help="seeds per variant (full: 3)")
    st.add_argument("--steps", type=int, default=None, help="training steps per run")
    st.add_argument("--threads", type=int, default=None, help="torch threads (default: free cores)")
    st.add_argument("--variants", default=None, help="comma-separated subset of the study's variants")
    st.add_argument("--docs", default=None, help="also write DOCS/study.md and DOCS/study_*.png")
    st.set_defaults(func=_study)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casa", description="Vision-language fusion with CASA.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    att = bench.add_parser("attention", help="time every attention backend on one packed batch")
    att.add_argument("--json", default="benchmarks/attention.json", help="where to write the results")
    att.add_argument("--plot", default=None, help="optional PNG of the timings")
    att.add_argument("--windows", type=int, default=16)
    att.add_argument("--image-tokens", type=int, default=256)
    att.add_argument("--text-tokens", type=int, default=256)
    att.add_argument("--heads", type=int, default=8)
    att.add_argument("--head-dim", type=int, default=64)
    att.add_argument("--backends", default=None, help="comma-separated subset (default: all available)")
    att.add_argument("--repeats", type=int, default=5)
    att.set_defaults(func=_bench_attention)
    _add_train_commands(sub, bench)
    _add_stream_commands(sub, bench)
    _add_build_command(sub)
    _add_study_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"casa: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
