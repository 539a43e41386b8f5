"""`casa train`: train a model (one process, or DDP / FSDP2 under torchrun).

Design decisions:
- The config (file + `--set`) is read and checked in full before anything
  else (`training.config.load_config`), then the trainer checks paths and
  devices before it builds the model: a mistake costs no compute.
- Exit codes: 0 done; 2 a user error (by `casa.cli.main`); 130 stopped by
  Ctrl-C, 143 by SIGTERM, after the trainer saved a checkpoint (or, on a
  second Ctrl-C, said which checkpoint is the latest); no traceback.
- `--threads` defaults to the free cores (`casa.threads.set_threads`).
- `--resume` continues the run as it was configured (the train config saved
  in its checkpoint, `training.trainer.resumed_config`); `--set` overrides
  given with it apply and are printed, values of `--config` that differ from
  the run's are named and not used.
"""

from __future__ import annotations

import argparse
import os
import sys

from casa.cli.values import positive_int

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="train a model (works under torchrun: DDP or FSDP2)")
    tr.add_argument("--config", default=None, help="JSON or TOML file with 'model' and 'train' sections")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override, e.g. train.steps=100 or model.lm.d_model=64 (repeatable)")
    tr.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                    help="continue the run of out_dir from its latest checkpoint (or from CHECKPOINT) with the "
                         "settings it was trained with; --set overrides apply and are printed")
    tr.add_argument("--skip-bad-samples", action="store_true", help="count and skip bad samples instead of failing")
    tr.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: free cores)")
    tr.add_argument("--quiet", action="store_true", help='no progress lines')
    tr.set_defaults(func=run)


def run(args) -> int:
    try:
        from casa.files import check_output_dir
        from casa.training.config import load_config

        model_cfg, cfg = load_config(args.config, args.set)  # before importing torch: a bad config fails at once
        check_output_dir(cfg.out_dir, "train.out_dir")
        from casa.threads import set_threads
        from casa.training.trainer import train

        set_threads(args.threads)
        resume = None
        if args.resume is not None:
            from casa.training.trainer import checkpoint_to_resume, resumed_config

            main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, one rank says it
            resume = checkpoint_to_resume(cfg.out_dir, args.resume)
            cfg = resumed_config(resume, cfg, args.set, log=lambda line: main_rank and print(line, file=sys.stderr))
        if args.skip_bad_samples:
            cfg.skip_bad_samples = True
        summary = train(model_cfg, cfg, resume=resume, quiet=args.quiet)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C (the trainer said what was saved)
        print("casa: interrupted", file=sys.stderr)
        return 130
    if summary.get("checkpoint"):
        print(f"checkpoint: {summary['checkpoint']}")
    if summary.get("skipped"):
        print(f"skipped {summary['skipped']} bad samples")
    return 130 if summary.get("interrupted") == "SIGINT" else 143 if summary.get("interrupted") else 0
