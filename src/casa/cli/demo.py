"""`casa demo`: train a small CASA model on the synthetic suite and show what it sees.

Design decisions:
- One command, no required flag: `casa demo` trains (or reuses) `runs/demo`
  and prints what the model sees; everything else is `casa.study.demo`.
- `--threads` defaults to 2 (fewer on a smaller machine), not the free cores
  other commands take: training at a fixed thread count prints the same
  table on every run (`casa.study.demo`).
"""

from __future__ import annotations

import argparse

from casa.cli.values import positive_int

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    de = sub.add_parser("demo", help="train a small CASA model on the synthetic suite and show what it sees")
    de.add_argument("--out", default="runs/demo",
                    help='run directory (checkpoint, metrics.json, loss.png, example images)')
    de.add_argument("--retrain", action="store_true", help="train again even if the run has a checkpoint")
    de.add_argument("--steps", type=positive_int, default=None, help='training steps (default: 1500)')
    de.add_argument("--eval-n", type=positive_int, default=None, help="evaluation samples per task (default: 60)")
    de.add_argument("--seed", type=int, default=0, help='random seed of the data and the model')
    de.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: 2, or the machine's cores if fewer: "
                                                                    "a fixed count, so that a rerun prints the same table)")
    de.set_defaults(func=run)


def run(args) -> int:
    from casa.files import check_output_dir
    from casa.study.demo import run

    check_output_dir(args.out, "--out")
    result = run(out=args.out, retrain=args.retrain, steps=args.steps, eval_n=args.eval_n, seed=args.seed,
                 threads=args.threads)
    return 130 if result.get("interrupted") else 0
