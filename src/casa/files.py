"""Writing outputs without losing anything: atomic files and directories,
and output paths checked before any work starts.

Design decisions:
- Every output casa writes (model directories, checkpoints, JSON results,
  SRT/JSONL files written at the end) is built under a temporary name beside
  its destination and renamed into place only when complete: a crash, a kill
  or an error leaves the previous version intact, never a half-written one.
- An existing directory is replaced by swapping (old moved aside, new renamed
  in, old removed), so at every instant the destination holds a complete
  version.
- Output paths are validated up front (`check_output_file`,
  `check_output_dir`), with a `ValueError` that names the path and the
  problem; commands call these before loading models or data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory", "atomic_file", "check_distinct", "check_output_dir", "check_output_file", "fsync_tree"]


def fsync_tree(path: Path) -> None:
    """Flush a file, or a directory and the files directly in it, to disk (best effort)."""
    for f in [*path.iterdir(), path] if path.is_dir() else [path]:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass  # some filesystems refuse fsync on directories
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(final: Path | str) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success it becomes
    `final` (replacing an existing one), on any exception it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{final.name}-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_tree(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path | str, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temporary file beside `path` for writing; on success it replaces
    `path`, on any exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        with open(name, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise


def _first_existing_parent(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(".")


def check_output_file(path: Path | str | None, what: str) -> Path | None:
    """A file casa will write: refuse a directory, a parent that is a file, an unwritable place."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory, not a file")
    parent = _first_existing_parent(path)
    if not parent.is_dir():
        raise ValueError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{what} {str(path)!r}: {str(parent)!r} is not writable")
    return path


def check_output_dir(path: Path | str, what: str) -> Path:
    """A directory casa will write into: refuse a file (or a parent that is a file)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file, not a directory")
    parent = _first_existing_parent(path) if not path.exists() else path
    if not parent.is_dir():
        raise ValueError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{what} {str(path)!r}: {str(parent)!r} is not writable")
    return path


def check_distinct(**paths: Path | str | None) -> None:
    """Refuse two outputs that name the same file (e.g. `--srt out.txt --jsonl out.txt`)."""
    seen: dict[Path, str] = {}
    for flag, p in paths.items():
        if p is None:
            continue
        key = Path(p).resolve()
        if key in seen:
            raise ValueError(f"{seen[key]} and {flag} both name {str(p)!r}: give each its own file")
        seen[key] = flag
