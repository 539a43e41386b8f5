"""`casa data export`: write a synthetic task as JSONL + PNG files."""

from __future__ import annotations

import argparse

from casa.cli.values import key_values


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data", required=True)
    ex = data.add_parser("export", help="write a synthetic task as JSONL + PNG files")
    ex.add_argument("--task", required=True)
    ex.add_argument("--n", type=int, default=100)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--difficulty", action="append", default=[], metavar="KEY=VALUE")
    ex.add_argument("dir")
    ex.set_defaults(func=run)


def run(args) -> int:
    from casa.data import make_sample, write_jsonl
    from casa.data.tasks import difficulty

    d = difficulty(key_values(args.difficulty))
    samples = [make_sample(args.task, args.seed, i, d) for i in range(args.n)]
    path = write_jsonl(samples, args.dir, name=f"{args.task}.jsonl")
    print(f"wrote {args.n} samples to {path}")
    return 0
