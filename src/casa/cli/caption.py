"""`casa caption`: caption a video file or an image folder, frame by frame, live."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
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
    cap.set_defaults(func=run)


def run(args) -> int:
    from casa.inference.cache import History
    from casa.inference.generate import EndOfTurnBias, RepetitionPenalty, Sampling
    from casa.inference.stream import caption_file

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
