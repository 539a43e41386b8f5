"""`casa data export`: write a synthetic task as JSONL + PNG files.

Design decisions:
- Every input is checked before a sample is drawn: `--n` by argparse, the
  output directory (`casa.files.check_output_dir`), the task name and the
  difficulty knobs (named, with what they accept).
- The export is `casa.data.write_jsonl`: `DIR/TASK.jsonl` and
  `DIR/images/TASK/`, replaced only once complete, so an earlier export is
  never left half-overwritten.
"""

from __future__ import annotations

import argparse

from casa.cli.values import TASK_NAMES, key_values, positive_int

__all__ = ["check", "register", "run"]


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
