"""`casa data export`: write a synthetic task as JSONL + PNG files; `casa data
video`: write a sample video to caption.

Design decisions:
- Every input is checked before a sample is drawn: `--n` by argparse, the
  output directory (`casa.files.check_output_dir`), the task name and the
  difficulty knobs (named, with what they accept).
- `data video` renders the synthetic `video` task (a shape stepping across a
  3 x 3 grid, the frames `casa demo`-style models see with "Caption each
  frame.") as a video file, written atomically, and prints each frame's
  reference caption, so a first `casa caption` has something to compare with.
- The export is `casa.data.write_jsonl`: `DIR/TASK.jsonl` and
  `DIR/images/TASK/`, replaced only once complete, so an earlier export is
  never left half-overwritten.
"""

from __future__ import annotations

import argparse

from casa.cli.values import TASK_NAMES, key_values, positive_float, positive_int
from casa.files import VIDEO_CONTAINERS

__all__ = ["check", "check_video", "register", "run", "run_video"]



def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data", required=True)
    ex = data.add_parser("export", help="write a synthetic task as JSONL + PNG files")
    ex.add_argument("--task", required=True, help=f"the synthetic task: one of {', '.join(TASK_NAMES)}")
    ex.add_argument("--n", type=positive_int, default=100, help="samples to write")
    ex.add_argument("--seed", type=int, default=0, help='random seed of the samples')
    ex.add_argument("--difficulty", action="append", default=[], metavar="KEY=VALUE",
                    help='a difficulty knob, repeatable (e.g. image_size=64, colors=4, max_shapes=3, frames=4)')
    ex.add_argument("dir", help="output directory (created if needed)")
    ex.set_defaults(func=run, check=check)
    vid = data.add_parser("video", help="write a sample video to caption: a shape stepping across a 3 x 3 grid "
                                        "(the synthetic video task)")
    vid.add_argument("out", help=f"the video file to write ({', '.join(VIDEO_CONTAINERS)})")
    vid.add_argument("--frames", type=positive_int, default=8, help="frames in the video")
    vid.add_argument("--fps", type=positive_float, default=2.0, help="its frame rate")
    vid.add_argument("--size", type=positive_int, default=128, help="frame side in pixels (even)")
    vid.add_argument("--seed", type=int, default=0, help="random seed of the shape, colour and path")
    vid.set_defaults(func=run_video, check=check_video)


def check(args) -> None:
    """The output directory and the difficulty items, before anything heavy is imported."""
    from casa.files import check_output_dir

    check_output_dir(args.dir, "output directory")
    key_values(args.difficulty)


def run(args) -> int:
    from casa.data import make_sample, write_jsonl
    from casa.data.tasks import check_tasks, difficulty

    [task] = check_tasks([args.task])
    d = difficulty(key_values(args.difficulty))
    samples = [make_sample(task, args.seed, i, d) for i in range(args.n)]
    path = write_jsonl(samples, args.dir, name=f"{task}.jsonl")
    print(f"wrote {len(samples)} samples to {path}")
    return 0


def check_video(args) -> None:
    """The output file's type and place, and an even frame side (the encoder's 4:2:0 chroma needs one)."""
    from pathlib import Path

    from casa.files import check_output_file

    check_output_file(args.out, "output video")
    if Path(args.out).suffix.lower() not in VIDEO_CONTAINERS:
        raise ValueError(f"output video {args.out!r}: expected a file name ending in {', '.join(VIDEO_CONTAINERS)}")
    if args.size % 2:
        raise ValueError(f"--size {args.size}: expected an even number of pixels")


def run_video(args) -> int:
    from casa.data.video import write_sample_video

    captions = write_sample_video(args.out, frames=args.frames, fps=args.fps, size=args.size, seed=args.seed)
    print(f"wrote {args.out}: {len(captions)} frames of {args.size} x {args.size} at {args.fps:g} fps; what each "
          "frame shows (the reference captions):")
    for i, caption in enumerate(captions):
        print(f"  {i / args.fps:6.1f} s  {caption}")
    return 0
