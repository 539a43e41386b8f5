"""`casa train`: train a model (one process, or DDP / FSDP2 under torchrun)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="train a model (works under torchrun: DDP or FSDP2)")
    tr.add_argument("--config", default=None, help="JSON or TOML file with 'model' and 'train' sections")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override, e.g. train.steps=100 or model.lm.d_model=64 (repeatable)")
    tr.add_argument("--resume", nargs="?", const="latest", default=None,
                    help="continue from the latest checkpoint of out_dir (or from the given checkpoint)")
    tr.add_argument("--skip-bad-samples", action="store_true", help="count and skip bad samples instead of failing")
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=run)


def run(args) -> int:
    from casa.training.trainer import load_config, train

    model_cfg, cfg = load_config(args.config, args.set)
    if args.skip_bad_samples:
        cfg.skip_bad_samples = True
    resume = args.resume if args.resume not in (None, "latest") else (args.resume == "latest" or None)
    summary = train(model_cfg, cfg, resume=resume, quiet=args.quiet)
    if summary.get("checkpoint"):
        print(f"checkpoint: {summary['checkpoint']}")
    if summary.get("skipped"):
        print(f"skipped {summary['skipped']} bad samples")
    return 130 if summary.get("interrupted") == "SIGINT" else 143 if summary.get("interrupted") else 0
