"""The `casa` command: one module per subcommand (`register` adds its parser,
`run` handles it); this file only assembles the parser and maps errors to
exit codes. Heavy modules are imported inside the handlers, so `casa --help`
stays fast."""

from __future__ import annotations

import argparse
import sys

from casa.cli import bench, build, caption, data, demo, study, train
from casa.cli import eval as eval_command

COMMANDS = (train, eval_command, demo, data, caption, build, study, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casa", description="Vision-language fusion with CASA.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"casa: error: {e}", file=sys.stderr)
        return 2
