"""What a casa model directory is, decided without loading it (and without importing torch).

Design decisions:
- A casa model directory is a folder whose `config.json` says
  `"casa_format": "casa-v1"`; nothing else is recognised, so no other folder
  is ever taken for one (and replaced, see `check_model_output`).
- Light on purpose: the CLI checks `--out` with it before importing torch, so
  a wrong destination is refused at once, before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path

from casa.files import check_replaceable_dir, read_json

__all__ = ["FORMAT", "check_model_output", "is_model_dir", "read_config"]

FORMAT = "casa-v1"


def read_config(path) -> dict:
    """The config.json of casa model directory `path` (ValueError if it is not one, DamagedFileError if damaged)."""
    path = Path(path)
    file = path / "config.json"
    if not path.is_dir() or not file.is_file():
        raise ValueError(f"{str(path)!r} is not a casa model directory (no config.json)")
    config = read_json(file)
    if not isinstance(config, dict) or config.get("casa_format") != FORMAT:
        found = config.get("casa_format") if isinstance(config, dict) else None
        raise ValueError(f"{str(path)!r} is not a casa model directory "
                         f"(config.json has casa_format={found!r}, expected {FORMAT!r})")
    return config


def is_model_dir(path) -> bool:
    """Whether `path` is a readable casa model directory (by its config.json)."""
    try:
        read_config(path)
    except ValueError:
        return False
    return True


def check_model_output(path, what: str = "output", *, overwrite: bool = False) -> Path:
    """`path` if a casa model directory may be written there: a new path, an empty folder, or (with
    `overwrite`) an existing casa model directory; else a ValueError naming `what` and the path."""
    return check_replaceable_dir(path, what, overwrite=overwrite, recognise=is_model_dir, kind="casa model directory")
