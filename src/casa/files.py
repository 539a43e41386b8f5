"""Files in and out without losing anything: atomic files and directories,
output paths checked before any work starts, and input files that are
damaged reported as such.

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
- A directory written as a whole (a model) only ever replaces a directory of
  its own kind, and only when asked (`check_replaceable_dir`): an existing
  file, or a folder holding anything else, is refused whatever `overwrite`
  says, because the swap would delete it.
- Outputs get the permissions of any file the user creates (0666 / 0777
  less the umask), not the 0600 / 0700 of `tempfile`'s private temporaries:
  others on a shared machine read a run as they read anything else there.
- A file that exists but cannot be parsed (zero bytes, cut short by a crash
  or a full disk) is a `DamagedFileError` naming the file and saying it is
  damaged or incomplete; `read_json` is the JSON reader that says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["DamagedFileError", "atomic_directory", "atomic_file", "check_distinct", "check_output_dir",
           "check_output_file", "check_replaceable_dir", "fsync_tree", "read_json", "VIDEO_CONTAINERS"]

# The video files casa writes (`casa data video`, `casa demo`'s sample): suffix -> PyAV container format.
VIDEO_CONTAINERS = {".mp4": "mp4", ".mkv": "matroska", ".avi": "avi"}


class DamagedFileError(ValueError):
    """A file that exists but cannot be read as what it should be (truncated, zero bytes, garbage)."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        super().__init__(f"{str(path)!r} is damaged or incomplete ({reason})")


def read_json(path: Path | str):
    """The parsed JSON of `path`; FileNotFoundError or DamagedFileError naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(path)!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DamagedFileError(path, f"cannot read it: {e}") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise DamagedFileError(path, "empty file" if not text.strip() else f"not valid JSON: {e}") from None


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


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (changing it to read it is a race
    with any thread creating files meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_created(path: Path, *, directory: bool) -> None:
    """Give a `tempfile` temporary the mode `open` / `mkdir` would have given it under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_directory(final: Path | str) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success it becomes
    `final` (replacing an existing one), on any exception it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    old = None
    try:
        _as_created(tmp, directory=True)
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{final.name}-", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
    except BaseException:
        # an error or a Ctrl-C between the two renames: put the previous version back
        if old is not None and not final.exists() and (old / final.name).exists():
            os.replace(old / final.name, final)
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_tree(final.parent)


@contextlib.contextmanager
def atomic_file(path: Path | str, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temporary file beside `path` for writing; on success it replaces
    `path`, on any exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        _as_created(Path(name), directory=False)
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


def check_replaceable_dir(path: Path | str, what: str, *, overwrite: bool, recognise: Callable[[Path], bool],
                          kind: str) -> Path:
    """A directory casa will write as a whole, replacing what is there.

    Allowed: a new path, an empty folder, and, with `overwrite`, a folder that
    `recognise` says is a `kind` (e.g. "casa model directory"). Refused, with
    a ValueError naming the path: a file, and a non-empty folder of anything
    else, whatever `overwrite` says (replacing it would delete its files).
    """
    path = check_output_dir(path, what)
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if not recognise(path):
        names = sorted(p.name for p in path.iterdir())
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ValueError(f"{what} {str(path)!r} is a folder that is not a {kind} (it holds {shown}); "
                         f"casa writes a {kind} only into a new or empty folder, or over one it wrote "
                         "(--overwrite): choose another path")
    if not overwrite:
        raise ValueError(f"{what} {str(path)!r} already holds a {kind}; pass --overwrite to replace it")
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
