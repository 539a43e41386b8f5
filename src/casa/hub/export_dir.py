"""What a transformers export is, decided without loading it (and without importing torch).

Design decisions:
- An export is a folder whose `config.json` says `"model_type": "casa"` and
  carries the `casa_export` record `hub.export` writes; nothing else is
  recognised, so no other folder is ever replaced by an export.
- Light on purpose: `casa export` checks `OUT` with it before torch is
  imported, as `pretrained.model_dir` does for model directories.
"""

from __future__ import annotations

from pathlib import Path

from casa.files import read_json

__all__ = ["FORMATS", "is_transformers_export"]

FORMATS = ("transformers",)  # `casa export --format` targets


def is_transformers_export(path) -> bool:
    """Whether `path` holds an export written by `hub.export.export_transformers` (by its config.json)."""
    try:
        config = read_json(Path(path) / "config.json")
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "casa" and "casa_export" in config
