"""`casa study`: train and compare every fusion variant (the paper's comparison, small)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("study", help="train and compare every fusion variant (the paper's comparison, small)")
    st.add_argument("--out", default="runs/study", help="directory for results.json, report.md and plots")
    st.add_argument("--quick", action="store_true", help="tiny model, 1 seed, a few minutes (CI)")
    st.add_argument("--seeds", type=int, default=None, help="seeds per variant (full: 3)")
    st.add_argument("--steps", type=int, default=None, help="training steps per run")
    st.add_argument("--threads", type=int, default=None, help="torch threads (default: free cores)")
    st.add_argument("--variants", default=None, help="comma-separated subset of the study's variants")
    st.add_argument("--docs", default=None, help="also write DOCS/study.md and DOCS/study_*.png")
    st.set_defaults(func=run)


def run(args) -> int:
    from casa.study.run import StudyConfig, run

    run(StudyConfig(out=args.out, size="quick" if args.quick else "full", seeds=args.seeds, steps=args.steps,
                    threads=args.threads, docs=args.docs,
                    **({"variants": args.variants.split(",")} if args.variants else {})))
    return 0
