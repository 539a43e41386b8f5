"""The `casa` command: one module per subcommand (`register` adds its parser,
`run` handles it, and an optional `check` validates the command line without
importing anything heavy); this module assembles the parser and turns every
way a command can end into an exit code and at most one line on stderr.

Design decisions:
- A user error (ValueError, FileNotFoundError and their subclasses such as
  DataError, and every argparse error) prints `casa: error: <message>` and
  exits 2. Commands raise these with a message that names the input (file,
  flag, key) and what is wrong with it; no traceback is shown.
- Anything else is a bug or a broken environment: one line,
  `casa: internal error: <type>: <message> (traceback in <log>)`, exit 1,
  with the traceback written to a log file under `$CASA_LOG_DIR` (default:
  `<system temp dir>/casa-logs`) for a bug report. `CASA_DEBUG=1` prints
  tracebacks inline instead, for every error.
- Ctrl-C (KeyboardInterrupt), start-up included, prints `casa: interrupted`
  and exits 130; a command that saves something on interrupt says what
  before that line. During start-up (the command's `check`, then the torch
  import, most of the start-up time) Ctrl-C is held until it ends: an
  import interrupted half-way leaves modules half-initialised, and the next
  access fails with a misleading error (seen: a RecursionError inside
  numpy) instead of the interrupt.
- Heavy modules (torch, models) are imported inside the handlers, after the
  command's `check`, so `casa --help` and flag errors answer at once.
- Every option has a help text and `--help` shows its default (`_Formatter`;
  `tests/test_cli.py` walks every subcommand); `casa --version` prints the
  installed version.
"""

from __future__ import annotations

import sys

try:  # Ctrl-C while the command modules load is an interrupt like any other
    import argparse
    import contextlib
    import os
    import signal
    import threading

    from casa.cli import bench, build, caption, chat, data, demo, export, serve, study, train
    from casa.cli import eval as eval_command
except KeyboardInterrupt:
    print("casa: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

__all__ = ["COMMANDS", "UsageError", "build_parser", "interrupts_held", "log_traceback", "main"]

COMMANDS = (train, eval_command, demo, data, chat, caption, serve, build, export, study, bench)
EXIT_USER_ERROR, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED = 2, 1, 130


class UsageError(ValueError):
    """A command line argparse refused (unknown flag, bad value, missing argument)."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default appended, unless it says nothing (None, off, empty) or the help
    text already gives it."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ([], "")
        if "default" in text or unset or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is raised (and reported by `main` in one line) instead of exiting, and help
    shows defaults (`_Formatter`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="casa", description="Vision-language fusion with CASA.")
    parser.add_argument("--version", action="version", version=f"casa {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def version() -> str:
    """The installed casa's version ("unknown" when casa runs from a tree that was not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("casa")
    except PackageNotFoundError:
        return "unknown"


def log_traceback(argv: list[str]) -> str:
    """Write the current exception's traceback to a new log file; returns its path."""
    import tempfile
    import time
    import traceback

    folder = os.environ.get("CASA_LOG_DIR") or os.path.join(tempfile.gettempdir(), "casa-logs")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"casa-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"command: casa {' '.join(argv)}\npython: {sys.version.split()[0]}\n\n")
        f.write(traceback.format_exc())
    return path


@contextlib.contextmanager
def interrupts_held():
    """Hold Ctrl-C until the block ends, then raise KeyboardInterrupt if one came (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pressed:
            raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the `casa` command line `argv` (default: `sys.argv[1:]`); returns the exit code."""
    process = argv is None  # the `casa` process itself, not a caller in Python
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("CASA_DEBUG", "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
        with interrupts_held():  # start-up: the command's own checks, then torch, which every command needs
            if getattr(args, "check", None) is not None:
                args.check(args)
            import torch  # noqa: F401
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            import traceback

            traceback.print_exc()
        print("casa: interrupted", file=sys.stderr)
        if process:
            # CPython 3.11 kills the process with SIGINT at exit (exit status -2, not 130) when a
            # KeyboardInterrupt has crossed an exec() of source text, as dataclass creation at import
            # does, even once handled; everything is written and closed by now, so leave directly.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError) as e:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"casa: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # noqa: BLE001 - the one place that reports what nothing else handled
        if debug:
            import traceback

            traceback.print_exc()
            print(f"casa: internal error: {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_INTERNAL_ERROR
        try:
            where = f"traceback in {log_traceback(argv)}"
        except OSError as log_error:
            where = f"no traceback log: {log_error}"
        message = " ".join(str(e).split()) or "(no message)"
        print(f"casa: internal error: {type(e).__name__}: {message} ({where})", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
