"""`casa caption`: caption a video file or an image folder, frame by frame, live.

Design decisions:
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
    cap = sub.add_parser("caption", help="caption a video file or image folder, frame by frame, live")
    cap.add_argument("video", help="a video file (decoded with PyAV) or a folder of images")
    cap.add_argument("--checkpoint", required=True, help="a casa model directory, or a training run (its latest checkpoint)")
    cap.add_argument("--fps", type=positive_float, default=None,
                     help="frames per second to caption (video: default every frame; folder: default 1)")
    cap.add_argument("--srt", default=None, help="SRT file (written to FILE.partial while running)")
    cap.add_argument("--jsonl", default=None, help="JSONL file, one line per frame and a summary line")
    cap.add_argument("--max-new-tokens", type=positive_int, default=16)
    cap.add_argument("--min-new-tokens", type=non_negative_int, default=0, help="no end token before this many tokens")
    cap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    cap.add_argument("--top-k", type=non_negative_int, default=0)
    cap.add_argument("--top-p", type=probability, default=1.0)
    cap.add_argument("--repetition-penalty", type=float, default=1.0, help="over the last tokens, across frames")
    cap.add_argument("--repetition-window", type=positive_int, default=64)
    cap.add_argument("--end-bias", type=float, default=0.0, help="added to the end token's logit")
    cap.add_argument("--end-slope", type=float, default=0.0, help="added to it per generated token")
    cap.add_argument("--sink", type=non_negative_int, default=None, help="bounded history: attention-sink tokens")
    cap.add_argument("--window", type=positive_int, default=None, help="bounded history: sliding-window tokens")
    cap.add_argument("--cache-dtype", default="model", choices=("model", "int8"),
                    help="key/value caches in the model's dtype, or int8 with a scale per row and head")
    cap.add_argument("--instruction", default="Caption each frame.", help="user text with the first frame")
    cap.add_argument("--allow-size-change", action="store_true", help="accept frames of varying sizes")
    cap.add_argument("--seed", type=int, default=0)
    cap.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: the free cores)")
    cap.add_argument("--quiet", action="store_true")
    cap.set_defaults(func=run)


def run(args) -> int:
    from casa.inference.sources import open_frames
    from casa.inference.writers import check_caption_outputs

    if (args.sink is None) != (args.window is None):
        raise ValueError("--sink and --window go together (bounded history)")
    # bad paths are refused before torch is imported (these modules do not import it)
    check_caption_outputs(args.video, args.srt, args.jsonl)
    frames = open_frames(args.video, fps=args.fps)

    from casa.core.layout import History
    from casa.inference.captioner import caption_file
    from casa.inference.generate import EndOfTurnBias, RepetitionPenalty, Sampling
    from casa.threads import set_threads

    set_threads(args.threads)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p)

    def processors(processor):
        stops = tuple(sorted(processor.stop_ids))
        out = []
        if args.repetition_penalty > 1:
            out.append(RepetitionPenalty(penalty=args.repetition_penalty, window=args.repetition_window,
                                         ignore=stops))
        if args.end_bias or args.end_slope or args.min_new_tokens:
            out.append(EndOfTurnBias(token_id=processor.end_of_turn_id, bias=args.end_bias, slope=args.end_slope,
                                     min_tokens=args.min_new_tokens, stop_ids=stops))
        return out

    def show(cap):
        if not args.quiet:
            print(f"[{cap.time:8.3f}s] {cap.text}  (ttft {cap.ttft_ms:.1f} ms, "
                  f"cache {cap.cache_bytes / 2**20:.2f} MiB)", flush=True)

    history = History(sink=args.sink, window=args.window) if args.sink is not None else None
    result = caption_file(args.video, checkpoint=args.checkpoint, fps=args.fps, srt=args.srt, jsonl=args.jsonl,
                          frames=frames, sampling=sampling, processors_fn=processors, history=history,
                          instruction=args.instruction, allow_size_change=args.allow_size_change, on_caption=show,
                          seed=args.seed, cache_dtype=args.cache_dtype)
    skipped = f" ({result.undecodable} undecodable frames skipped)" if result.undecodable else ""
    wrote = "".join(f"; wrote {p}" for p in result.outputs)
    if result.interrupted:
        print(f"casa caption: interrupted after {result.frames} frames{skipped}{wrote or '; nothing written'}",
              file=sys.stderr)
        return INTERRUPTED
    print(f"captioned {result.frames} frames{skipped}{wrote}", file=sys.stderr)
    return 0
