"""`casa caption`: caption a video file, an image folder or a live stream, frame by frame.

Design decisions:
- A live source (a URL, a camera, a named pipe, `-` for stdin, or any source
  with `--input-format`) and a file with `--realtime` go through the live
  scheduler (`casa.inference.live`): the newest frame is captioned whenever
  the model is free, the others are dropped and counted; each caption
  reports its lag. The source is opened (and a bad one refused) before the
  model loads. Live runs keep a bounded history by default (sink + window,
  said on stderr when the run starts); `--history full` opts out.
- A live run writes its SRT / JSONL in place, readable while it runs; a
  file run writes `<file>.partial` and replaces the destination at the end.
- Bad values are refused by argparse (`--fps 0`, `--threads -1`, ...); bad
  paths (outputs that name a folder, a file as a parent, the same file twice,
  a missing video) are refused by `caption_file` before the model loads.
- The SRT / JSONL are written progressively to `<file>.partial` and replace
  their destinations when the run ends (see `inference/writers.py`).
- Ctrl-C stops the run cleanly: the captions so far are saved, the command
  says what it wrote and exits with 130, without a traceback.
- Threads default to the free cores (`casa.threads.set_threads`).
"""

from __future__ import annotations

import argparse
import sys

from casa.cli.values import non_negative_int, positive_float, positive_int, probability

__all__ = ["register", "run"]

INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)


def register(sub: argparse._SubParsersAction) -> None:
    cap = sub.add_parser("caption", help="caption a video file, an image folder or a live stream, frame by frame")
    cap.add_argument("video", nargs="+",
                     help="a video file (decoded with PyAV), a folder of images, or a live stream: a URL FFmpeg opens "
                          "(rtsp://, rtmp://, http(s)://, udp://, tcp://, srt://), a camera (/dev/video0), a named "
                          "pipe, or - for stdin; several sources are captioned at once over one loaded model, their "
                          "decoded tokens batched (give --out-dir)")
    cap.add_argument("--checkpoint", required=True, help="a casa model directory, or a training run (its latest checkpoint)")
    cap.add_argument("--fps", type=positive_float, default=None,
                     help="frames per second to caption (video: default every frame; folder: default 1)")
    cap.add_argument("--srt", default=None, help="SRT file (written to FILE.partial while running)")
    cap.add_argument("--jsonl", default=None, help="JSONL file, one line per frame and a summary line")
    cap.add_argument("--out-dir", default=None,
                     help="several sources: the folder of their SRT and JSONL files (N_NAME.srt, N_NAME.jsonl)")
    cap.add_argument("--max-new-tokens", type=positive_int, default=32, help='most tokens per caption (a caption usually ends before, at its end token)')
    cap.add_argument("--min-new-tokens", type=non_negative_int, default=0, help="no end token before this many tokens")
    cap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    cap.add_argument("--top-k", type=non_negative_int, default=0, help='sample from the k most likely tokens (0: all)')
    cap.add_argument("--top-p", type=probability, default=1.0,
                     help='nucleus sampling: the smallest set of tokens with this much probability (1: all)')
    cap.add_argument("--repetition-penalty", type=float, default=1.0, help="over the last tokens, across frames")
    cap.add_argument("--repetition-window", type=positive_int, default=64,
                     help='tokens --repetition-penalty looks back over')
    cap.add_argument("--end-bias", type=float, default=0.0, help="added to the end token's logit")
    cap.add_argument("--end-slope", type=float, default=0.0, help="added to it per generated token")
    cap.add_argument("--no-repeat-ngram", type=non_negative_int, default=0,
                     help="forbid repeating an n-gram of this size generated in earlier frames or this one (0: off)")
    cap.add_argument("--no-repeat-window", type=positive_int, default=256, help="tokens the n-grams come from")
    cap.add_argument("--sink", type=non_negative_int, default=None, help="bounded history: attention-sink tokens")
    cap.add_argument("--window", type=positive_int, default=None, help="bounded history: sliding-window tokens")
    cap.add_argument("--history", choices=("bounded", "full"), default=None,
                     help="bounded (sink + window; the default for live sources) or full (the default for files)")
    live = cap.add_argument_group("live sources")
    live.add_argument("--realtime", action="store_true",
                      help="a file at its own pace through the live scheduler (newest frame wins, late frames dropped)")
    live.add_argument("--input-format", default=None,
                      help="FFmpeg input format (x11grab, v4l2, mpegts, ...); makes the source live")
    live.add_argument("--input-option", action="append", default=[], metavar="KEY=VALUE",
                      help="FFmpeg input option, repeatable (e.g. rtsp_transport=tcp, video_size=1280x720)")
    live.add_argument("--open-timeout", type=positive_float, default=10.0, help="seconds to wait for a stream to open")
    live.add_argument("--read-timeout", type=positive_float, default=5.0,
                      help="seconds without data before a stream counts as stalled")
    live.add_argument("--reconnect", type=non_negative_int, default=5,
                      help="reconnection attempts after a network stream drops (0: its end ends the run)")
    live.add_argument("--reconnect-delay", type=positive_float, default=0.5,
                      help="seconds before the first attempt, doubled for each next one")
    cap.add_argument("--cache-dtype", default="model", choices=("model", "int8"),
                    help="key/value caches in the model's dtype, or int8 with a scale per row and head")
    cap.add_argument("--instruction", default="Caption each frame.", help="user text with the first frame")
    cap.add_argument("--allow-size-change", action="store_true", help="accept frames of varying sizes")
    cap.add_argument("--seed", type=int, default=0, help='random seed for sampling')
    cap.add_argument("--threads", type=positive_int, default=None,
                     help="CPU threads (default: the free cores; with several sources, 1 for each)")
    cap.add_argument("--quiet", action="store_true", help='no captions or progress on the terminal')
    cap.set_defaults(func=run)


def _input_options(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--input-option {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def run(args) -> int:
    if isinstance(args.video, list):
        if len(args.video) > 1:
            return _run_many(args)
        if args.out_dir is not None:
            raise ValueError("--out-dir is for several sources; one source takes --srt / --jsonl")
        args.video = args.video[0]
    from casa.inference.sources import is_live, open_frames
    from casa.inference.writers import check_caption_outputs

    if (args.sink is None) != (args.window is None):
        raise ValueError("--sink and --window go together (bounded history)")
    if args.history == "full" and args.sink is not None:
        raise ValueError("--history full keeps everything: it takes no --sink / --window")
    live = args.realtime or is_live(args.video, args.input_format)
    options = _input_options(args.input_option)
    if live:
        from casa.inference.live import open_live

        check_caption_outputs(None if args.video == "-" or "://" in args.video else args.video, args.srt, args.jsonl)
        opened = open_live(args.video, fps=args.fps, realtime=args.realtime, input_format=args.input_format,
                           options=options, open_timeout=args.open_timeout, read_timeout=args.read_timeout)
    else:
        check_caption_outputs(args.video, args.srt, args.jsonl)
        frames = open_frames(args.video, fps=args.fps)

    from casa.core.layout import History
    from casa.inference.generate import EndOfTurnBias, NoRepeatNGram, RepetitionPenalty, Sampling
    from casa.inference.live import LIVE_HISTORY
    from casa.threads import set_threads

    if not getattr(args, "shared", False):  # several sources: set once, for all of them
        set_threads(args.threads)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p)

    def processors(processor):
        stops = tuple(sorted(processor.stop_ids))
        out = []
        if args.repetition_penalty > 1:
            out.append(RepetitionPenalty(penalty=args.repetition_penalty, window=args.repetition_window,
                                         ignore=stops))
        if args.no_repeat_ngram:
            out.append(NoRepeatNGram(n=args.no_repeat_ngram, window=max(args.no_repeat_window, args.no_repeat_ngram),
                                     ignore=stops))
        if args.end_bias or args.end_slope or args.min_new_tokens:
            out.append(EndOfTurnBias(token_id=processor.end_of_turn_id, bias=args.end_bias, slope=args.end_slope,
                                     min_tokens=args.min_new_tokens, stop_ids=stops))
        return out

    if args.sink is not None:
        history = History(sink=args.sink, window=args.window)
    elif args.history == "bounded" or (live and args.history is None):
        history = LIVE_HISTORY
    else:
        history = None
    common = dict(checkpoint=args.checkpoint, fps=args.fps, srt=args.srt, jsonl=args.jsonl, sampling=sampling,
                  processors_fn=processors, history=history, instruction=args.instruction,
                  allow_size_change=args.allow_size_change, seed=args.seed, cache_dtype=args.cache_dtype)
    if live:
        return _run_live(args, opened, common, options)

    label = getattr(args, "label", "")

    def show(cap):
        if not args.quiet:
            print(f"{label}[{cap.time:8.3f}s] {cap.text or '(silent)'}  (ttft {cap.ttft_ms:.1f} ms, "
                  f"cache {cap.cache_bytes / 2**20:.2f} MiB)", flush=True)

    from casa.inference.captioner import caption_file

    result = caption_file(args.video, frames=frames, on_caption=show, **common)
    skipped = f" ({result.undecodable} undecodable frames skipped)" if result.undecodable else ""
    wrote = "".join(f"; wrote {p}" for p in result.outputs)
    if result.interrupted:
        print(f"casa caption: interrupted after {result.frames} frames{skipped}{wrote or '; nothing written'}",
              file=sys.stderr)
        return INTERRUPTED
    print(f"{label}captioned {result.frames} frames{skipped}{wrote}", file=sys.stderr)
    return 0


def _run_many(args) -> int:
    """Several sources at once, one thread each, over one loaded model (`captioner.SharedModel`):
    their decoded tokens batched on the kernel path; each source's captions those it gets alone."""
    import copy
    import re
    import threading
    from pathlib import Path

    from casa.files import check_output_dir
    from casa.threads import set_threads

    if args.srt or args.jsonl:
        raise ValueError("several sources: give --out-dir DIR (each source's SRT and JSONL go there), "
                         "not --srt / --jsonl")
    if args.out_dir is None:
        raise ValueError("several sources: --out-dir DIR is needed (each source's SRT and JSONL go there)")
    if "-" in args.video and args.video.count("-") > 1:
        raise ValueError("stdin (-) can be one source only")
    check_output_dir(args.out_dir, "--out-dir")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # one thread per source by default: the sources share the cores, and the kernels batch their tokens
    set_threads(args.threads or 1)
    from casa.inference.captioner import SharedModel

    shared = SharedModel.load(args.checkpoint)
    runs, errors = [], []
    for i, source in enumerate(args.video):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.rstrip("/")).stem or "stdin")
        one = copy.copy(args)
        one.video, one.out_dir, one.checkpoint, one.shared = source, None, shared, True
        one.srt, one.jsonl, one.label = str(out / f"{i}_{stem}.srt"), str(out / f"{i}_{stem}.jsonl"), f"[{i}] "
        runs.append(one)

    def caption(one) -> None:
        try:
            if run(one) != 0:
                errors.append(f"{one.video}: interrupted")
        except Exception as e:  # noqa: BLE001 - reported with its source; the others go on
            errors.append(f"{one.video}: {e}")

    # daemons: Ctrl-C ends the command (a source not finished keeps its captions in its .partial files)
    threads = [threading.Thread(target=caption, args=(one,), name=f"casa-caption-{i}", daemon=True)
               for i, one in enumerate(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if shared.batcher is not None:
        shared.batcher.close()
        print(f"casa caption: {len(runs)} sources, {shared.batcher.rows} tokens decoded in {shared.batcher.steps} "
              "batched steps", file=sys.stderr)
    if errors:
        raise ValueError("; ".join(errors))
    return 0


def _run_live(args, opened, common: dict, options: dict) -> int:
    from casa.inference.live import caption_live

    name = "stdin" if args.video == "-" else args.video
    history = common["history"]
    kept = (f"bounded history (sink {history.sink} + window {history.window} tokens; --history full keeps "
            "everything)" if history else "full history (memory grows with the stream)")
    print(f"casa caption: {'realtime' if args.realtime else 'live'} {name}: newest frame captioned whenever the "
          f"model is free, late frames dropped; {kept}", file=sys.stderr, flush=True)

    def show(live):
        cap = live.caption
        if not args.quiet:
            print(f"[{cap.time:8.3f}s] {cap.text or '(silent)'}  (lag {live.lag * 1e3:.0f} ms, dropped "
                  f"{live.dropped}, ttft {cap.ttft_ms:.1f} ms, cache {cap.cache_bytes / 2**20:.2f} MiB)", flush=True)

    def event(e):
        if e["event"] == "disconnected":
            print(f"casa: warning: {name}: {e['reason']}; reconnecting ({args.reconnect} attempts, the first in "
                  f"{args.reconnect_delay:g} s)", file=sys.stderr, flush=True)
        elif e["event"] == "reconnect_failed":
            print(f"casa: warning: {name}: reconnection attempt {e['attempt']} failed: {e['reason']}",
                  file=sys.stderr, flush=True)
        elif e["event"] == "reconnected":
            print(f"casa: {name}: reconnected after {e['after_s']:.1f} s (attempt {e['attempt']})", file=sys.stderr,
                  flush=True)

    result = caption_live(args.video, opened=opened, realtime=args.realtime, input_format=args.input_format,
                          options=options, open_timeout=args.open_timeout, read_timeout=args.read_timeout,
                          reconnects=args.reconnect, backoff=args.reconnect_delay, on_caption=show, on_event=event,
                          **common)
    st = result.stats
    lag = st["lag_ms"]
    figures = (f"{st['captioned']} of {st['captioned'] + st['dropped']} frames captioned, {st['dropped']} dropped "
               f"({100 * st['drop_rate']:.1f}%)" + (f", lag p50 {lag['p50']:.0f} ms p95 {lag['p95']:.0f} ms max "
                                                    f"{lag['max']:.0f} ms" if lag else ""))
    wrote = "".join(f"; wrote {p}" for p in result.outputs)
    if result.interrupted:
        print(f"casa caption: interrupted: {figures}{wrote}", file=sys.stderr)
        return INTERRUPTED
    if st["end"].startswith("lost"):
        print(f"casa: warning: {name}: stream {st['end']}", file=sys.stderr)
    print(f"{figures}; {st['end']}{wrote}", file=sys.stderr)
    return 0
