"""`casa study`: train and compare every fusion variant (the paper's comparison, small).

Design decisions:
- The flags map one to one onto `casa.study.run.StudyConfig`, which checks
  variant names; counts are checked by argparse, the output folders before
  any training.
- `--threads` defaults to the free cores (`casa.threads.set_threads`).
- Ctrl-C: the `--jobs` workers ignore it and the pool ends them at once
  (`casa.workers`); the command says what is saved (stage-0 parts, arm runs)
  for a rerun to reuse, then exits 130.
"""

from __future__ import annotations

import argparse
import sys

from casa.cli.values import positive_int

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("study", help="train and compare every fusion variant (the paper's comparison, small)")
    st.add_argument("--out", default="runs/study", help="directory for results.json, report.md and plots")
    st.add_argument("--quick", action="store_true",
                    help="tiny model, 1 seed, both stages and regimes: about 25 s on 2 CPU cores (CI)")
    st.add_argument("--seeds", type=positive_int, default=None, help="seeds of every arm (full: 3, and 5 for the arms the headline claims compare)")
    st.add_argument("--steps", type=positive_int, default=None, help="training steps per run")
    st.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: free cores)")
    st.add_argument("--jobs", type=positive_int, default=1,
                    help="worker processes sharing --threads: stage 0 and the arms of every seed run side by side, "
                         "the longest ready first (e.g. 2 on 2 cores)")
    st.add_argument("--variants", default=None, help="comma-separated subset of the study's variants")
    st.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: a larger model, more data and steps (the full size only)")
    st.add_argument("--docs", default=None, help="also write DOCS/study.md and DOCS/study_*.png")
    st.set_defaults(func=run)


def run(args) -> int:
    from casa.files import check_output_dir
    from casa.study.run import StudyConfig, run, saved_summary

    cfg = StudyConfig(out=args.out, size="quick" if args.quick else "full", seeds=args.seeds, steps=args.steps,
                      threads=args.threads, docs=args.docs, device=args.device, jobs=args.jobs,
                      **({"variants": [v.strip() for v in args.variants.split(",")]} if args.variants else {}))
    check_output_dir(args.out, "--out")
    if args.docs:
        check_output_dir(args.docs, "--docs")
    try:
        run(cfg)
    except KeyboardInterrupt:  # workers ignore Ctrl-C and are ended by the pool; say what a rerun reuses
        print(saved_summary(cfg), file=sys.stderr)
        raise
    return 0
