"""`casa demo`: train a small CASA model on the synthetic suite and show what it sees."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    de = sub.add_parser("demo", help="train a small CASA model on the synthetic suite and show what it sees")
    de.add_argument("--out", default="runs/demo")
    de.add_argument("--retrain", action="store_true", help="train again even if the run has a checkpoint")
    de.add_argument("--steps", type=int, default=None)
    de.add_argument("--eval-n", type=int, default=None, help="evaluation samples per task")
    de.add_argument("--seed", type=int, default=0)
    de.set_defaults(func=run)


def run(args) -> int:
    from casa.study.demo import run

    run(out=args.out, retrain=args.retrain, steps=args.steps, eval_n=args.eval_n, seed=args.seed)
    return 0
