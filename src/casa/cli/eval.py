"""`casa eval`: greedy evaluation on synthetic tasks, a JSONL file or a local standard benchmark."""

from __future__ import annotations

import argparse

from casa.cli.values import key_values


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint with greedy decoding")
    ev.add_argument("--checkpoint", required=True, help="model directory or run directory (latest checkpoint)")
    ev.add_argument("--task", default=None, help="comma-separated synthetic tasks (default: the training tasks)")
    ev.add_argument("--data", default=None, help="a JSONL file instead of synthetic tasks")
    ev.add_argument("--n", type=int, default=64, help="samples per synthetic task")
    ev.add_argument("--seed", type=int, default=None)
    ev.add_argument("--difficulty", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--blind", action="store_true", help="withhold the images")
    ev.add_argument("--json", default=None, help="output file (default: CHECKPOINT/eval.json)")
    ev.add_argument("--backend", default="auto")
    ev.add_argument("--skip-bad-samples", action="store_true")
    ev.add_argument("--bench", default=None, choices=["chartqa", "docvqa", "infovqa", "textvqa", "ai2d", "gqa"],
                    help="a standard benchmark stored locally (needs --root) instead of synthetic tasks")
    ev.add_argument("--root", default=None, help="directory of the local benchmark copy (parquet or JSON layout)")
    ev.add_argument("--split", default=None)
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    ev.set_defaults(func=run)


def run(args) -> int:
    if args.bench:
        if not args.root:
            raise ValueError("--bench needs --root, the directory of the local benchmark copy")
        from casa.eval.stdbench import run as run_benchmark

        run_benchmark(args.checkpoint, args.bench, args.root, split=args.split, limit=args.limit,
                      json_path=args.json, backend=args.backend)
        return 0
    from casa.eval.synthetic import run

    run(args.checkpoint, tasks=args.task.split(",") if args.task else None, data=args.data, n=args.n,
        seed=args.seed, difficulty=key_values(args.difficulty), blind=args.blind, json_path=args.json,
        backend=args.backend, skip_bad=args.skip_bad_samples)
    return 0
