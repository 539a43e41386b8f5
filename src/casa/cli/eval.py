"""`casa eval`: greedy evaluation on synthetic tasks, a JSONL file or a local standard benchmark.

Design decisions:
- Flags are checked by argparse where a type says it all (`--n 0` is
  refused with the flag named); `check` refuses, before anything is loaded,
  combinations that cannot mean anything (`--data` with `--task`, `--root`
  without `--bench`, ...), a `--json` that cannot be written and a
  checkpoint that is not a casa model or run; everything else is checked by
  `casa.eval.run` before any compute.
- `--threads` defaults to the free cores (`casa.threads.set_threads`).
"""

from __future__ import annotations

import argparse

from casa.cli.values import TASK_NAMES, key_values, positive_int

__all__ = ["BENCHMARK_NAMES", "check", "register", "run"]

BENCHMARK_NAMES = ("chartqa", "docvqa", "infovqa", "textvqa", "ai2d", "gqa")  # casa.eval.stdbench.BENCHMARKS
DEFAULT_N = 64


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint with greedy decoding")
    ev.add_argument("--checkpoint", required=True, help="model directory or run directory (latest checkpoint)")
    ev.add_argument("--task", default=None, help="comma-separated synthetic tasks (default: the training tasks); from: "
                                                          f"{', '.join(TASK_NAMES)}")
    ev.add_argument("--data", default=None, help="a JSONL file instead of synthetic tasks")
    ev.add_argument("--n", type=positive_int, default=None, help=f"samples per synthetic task (default {DEFAULT_N})")
    ev.add_argument("--seed", type=int, default=None,
                    help="seed of the synthetic samples (default: the run's training seed; "
                         "evaluation samples are held out from training by + 1000)")
    ev.add_argument("--difficulty", action="append", default=[], metavar="KEY=VALUE",
                    help="a difficulty knob of the synthetic tasks, repeatable (e.g. image_size=64; "
                         "default: the run's)")
    ev.add_argument("--blind", action="store_true", help="withhold the images")
    ev.add_argument("--json", default=None, help="output file (default: CHECKPOINT/eval.json)")
    ev.add_argument("--backend", default="auto", help="attention backend: auto, reference, windowed, flex, flash")
    ev.add_argument("--skip-bad-samples", action="store_true",
                    help='count and skip unreadable samples of --data instead of failing')
    ev.add_argument("--max-tokens", type=positive_int, default=None,
                    help="most tokens a prompt plus its answer may take (default: the checkpoint's training "
                         "budget, train.text_tokens)")
    ev.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: the free cores)")
    ev.add_argument("--bench", default=None, choices=BENCHMARK_NAMES,
                    help="a standard benchmark stored locally (needs --root) instead of synthetic tasks")
    ev.add_argument("--root", default=None, help="directory of the local benchmark copy (parquet or JSON layout)")
    ev.add_argument("--split", default=None, help="split of --bench (default: the benchmark's usual evaluation split)")
    ev.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N examples only")
    ev.set_defaults(func=run, check=check)


def check(args) -> None:
    """The command line, cheapest first: flag combinations, `--json`, then the checkpoint."""
    from casa.files import check_output_file

    _check_combination(args)
    key_values(args.difficulty)
    check_output_file(args.json, "--json")
    from casa.pretrained.model_dir import read_config
    from casa.pretrained.runs import resolve_model_dir

    read_config(resolve_model_dir(args.checkpoint))


def _check_combination(args) -> None:
    if args.bench:
        if not args.root:
            raise ValueError("--bench needs --root, the directory of the local benchmark copy")
        given = [f for f, v in (("--task", args.task), ("--data", args.data), ("--n", args.n),
                                ("--difficulty", args.difficulty), ("--seed", args.seed is not None),
                                ("--blind", args.blind)) if v]
        if given:
            raise ValueError(f"{', '.join(given)}: not used with --bench (a benchmark has its own questions)")
        return
    given = [f for f, v in (("--root", args.root), ("--split", args.split), ("--limit", args.limit)) if v]
    if given:
        raise ValueError(f"{', '.join(given)}: only used with --bench")
    synthetic = (("--task", args.task), ("--n", args.n), ("--difficulty", args.difficulty),
                 ("--seed", args.seed is not None))
    if args.data and any(v for _, v in synthetic):
        flags = [f for f, v in synthetic if v]
        raise ValueError(f"--data and {', '.join(flags)}: pick one (--data evaluates every sample of the file; "
                         "the others choose synthetic samples)")


def run(args) -> int:
    from casa.threads import set_threads

    difficulty = key_values(args.difficulty)
    set_threads(args.threads)
    if args.bench:
        from casa.eval.run import run_benchmark

        run_benchmark(args.checkpoint, args.bench, args.root, split=args.split, limit=args.limit,
                      json_path=args.json, backend=args.backend, max_tokens=args.max_tokens)
        return 0
    from casa.eval.run import run as run_eval

    tasks = [t.strip() for t in args.task.split(",")] if args.task else None
    run_eval(args.checkpoint, tasks=tasks, data=args.data, n=args.n or DEFAULT_N, seed=args.seed,
             difficulty=difficulty, blind=args.blind, json_path=args.json, backend=args.backend,
             skip_bad=args.skip_bad_samples, max_tokens=args.max_tokens)
    return 0
