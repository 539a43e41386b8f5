"""The `casa` command. Each subcommand lives in its own module; this file only
parses arguments and dispatches, importing heavy modules lazily."""

from __future__ import annotations

import argparse
import sys


def _bench_attention(args) -> int:
    from .bench.attention import run

    run(json_path=args.json, windows=args.windows, image_tokens=args.image_tokens,
        text_tokens=args.text_tokens, heads=args.heads, head_dim=args.head_dim,
        backends=args.backends.split(",") if args.backends else None, repeats=args.repeats,
        plot_path=args.plot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casa", description="Vision-language fusion with CASA.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    att = bench.add_parser("attention", help="time every attention backend on one packed batch")
    att.add_argument("--json", default="benchmarks/attention.json", help="where to write the results")
    att.add_argument("--plot", default=None, help="optional PNG of the timings")
    att.add_argument("--windows", type=int, default=16)
    att.add_argument("--image-tokens", type=int, default=256)
    att.add_argument("--text-tokens", type=int, default=256)
    att.add_argument("--heads", type=int, default=8)
    att.add_argument("--head-dim", type=int, default=64)
    att.add_argument("--backends", default=None, help="comma-separated subset (default: all available)")
    att.add_argument("--repeats", type=int, default=5)
    att.set_defaults(func=_bench_attention)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"casa: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
