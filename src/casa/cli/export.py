"""`casa export --format transformers DIR OUT`: a casa model as a transformers directory.

Design decisions:
- `DIR` is a model directory or a run (its latest readable checkpoint), as
  for every other command; `OUT` must be new, an empty folder, or (with
  `--overwrite`) an earlier export. Both are checked before torch is
  imported, and what the export cannot carry (a transformers vision tower,
  dynamic resolution, M-RoPE) is refused before anything is written
  (`casa.hub.export`).
- `--format` names the target so that other targets can join; transformers
  is the one there is.
"""

from __future__ import annotations

import argparse

__all__ = ["check", "register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    from casa.hub.export_dir import FORMATS

    e = sub.add_parser("export", help="write a casa model as a transformers directory (trust_remote_code)")
    e.add_argument("checkpoint", metavar="DIR", help="model directory or run directory (latest checkpoint)")
    e.add_argument("out", metavar="OUT", help="directory to write (new, empty, or see --overwrite)")
    e.add_argument("--format", required=True, choices=FORMATS, help="target format")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier export")
    e.set_defaults(func=run, check=check)


def check(args) -> None:
    from casa.files import check_replaceable_dir
    from casa.hub.export_dir import is_transformers_export
    from casa.pretrained.model_dir import read_config
    from casa.pretrained.runs import resolve_model_dir

    read_config(resolve_model_dir(args.checkpoint))
    check_replaceable_dir(args.out, "OUT", overwrite=args.overwrite, recognise=is_transformers_export,
                          kind="transformers export")


def run(args) -> int:
    from casa.hub.export import export_transformers

    path = export_transformers(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote {path} (load it with transformers: AutoModelForCausalLM.from_pretrained({str(path)!r}, "
          "trust_remote_code=True), AutoProcessor likewise)")
    return 0
