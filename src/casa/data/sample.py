"""The sample format: chat messages, as JSONL on disk.

One sample is `{"messages": [...]}` (other top-level keys, e.g. "task" or
"metric", ride along). A message is `{"role": "system"|"user"|"assistant",
"content": str | [part, ...]}` and a part is one of
`{"type": "text", "text": str}`, `{"type": "image", "path": str}` (relative
to the JSONL file) or `{"type": "video", "frames": [path, ...]}` (each frame
gets a window of its own: `data.Processor`). In memory an image part may hold
a PIL image under "image" instead of a path, and a video part PIL frames.

Design decisions:
- Structure is checked when a line is read, so a bad line is reported with
  its file and line number before any training or evaluation starts (a
  "metric" key must name one of `casa.data.metrics.METRICS`); images are
  decoded lazily by the processor, whose errors carry the same `file:line`
  (`Sample.source`). `skip_bad=True` turns errors into a counted skip.
- A file with no usable sample is an error, never an empty dataset.
- `write_jsonl` writes in-memory images and video frames as PNG files and
  their parts with paths (a video part stays one video part, its frames in
  order), so `read_jsonl` gives back the samples the processor rendered.
- `write_jsonl` never leaves a half-written file or image folder: the images
  go to `images/<name>/` (one folder per JSONL file, so two exports into one
  directory cannot overwrite each other's images), built under a temporary
  name and swapped in whole, then the JSONL file is replaced atomically. An
  error or Ctrl-C before the swap leaves an earlier export untouched; only a
  crash between the two renames could pair the earlier JSONL with the new
  images.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from casa.data.metrics import METRICS
from casa.files import atomic_directory, atomic_file

__all__ = ["ROLES", "DataError", "Sample", "check_messages", "check_sample", "read_jsonl", "write_jsonl"]

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A sample that cannot be used; the message starts with `file:line`."""


@dataclass
class Sample:
    """One chat: `messages` as in the module docstring, where it came from, and its other keys."""

    messages: list[dict]
    source: str = "<memory>"  # "file:line", for error messages
    meta: dict = field(default_factory=dict)  # other top-level keys (task, metric, ...)


def _check_part(part, where: str, base: Path | None) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict) or "type" not in part:
        raise DataError(f"{where}: content part {part!r} is not an object with a 'type'")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise DataError(f"{where}: text part without a string 'text'")
        return part
    if kind == "image":
        if "image" in part:
            return part
        path = part.get("path", part.get("url"))
        if not isinstance(path, str):
            raise DataError(f"{where}: image part without a 'path'")
        return {"type": "image", "path": _resolve(path, base)}
    if kind == "video":
        frames = part.get("frames", part.get("video"))  # "video": the frames, as transformers' messages name them
        if not isinstance(frames, list) or not frames:
            raise DataError(f"{where}: video part without a non-empty 'frames' list")
        return {"type": "video", "frames": [f if not isinstance(f, str) else _resolve(f, base) for f in frames]}
    raise DataError(f"{where}: unknown content part type {kind!r} (expected text, image or video)")


def _resolve(path: str, base: Path | None) -> str:
    return path if base is None or os.path.isabs(path) else str(base / path)


def check_messages(messages, where: str = "<memory>", base: Path | None = None) -> list[dict]:
    """Chat messages in the shape of the module docstring, normalised (string contents become text parts,
    image paths are resolved against `base`, a video part's `"video": [frames]` becomes `"frames"`), or a
    DataError naming `where` and the message. No assistant turn is required (a prompt has none)."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: expected a list of messages ({{'role': ..., 'content': ...}}), "
                        f"got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: message {i} has no role in {ROLES}")
        content = m.get("content")
        parts = [content] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise DataError(f"{where}: message {i} content must be a string or a list of parts")
        parts = [_check_part(p, f"{where}: message {i}", base) for p in parts]
        if m["role"] == "assistant" and any(p["type"] != "text" for p in parts):
            raise DataError(f"{where}: message {i}: assistant messages may only hold text")
        out.append({"role": m["role"], "content": parts})
    return out


def check_sample(obj, where: str = "<memory>", base: Path | None = None) -> Sample:
    """A validated `Sample` from a decoded JSON object, or a DataError naming `where`."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise DataError(f"{where}: expected an object with a 'messages' list")
    messages = check_messages(obj["messages"], where, base)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: sample has no assistant turn (nothing to train on or to evaluate)")
    meta = {k: v for k, v in obj.items() if k != "messages"}
    if "metric" in meta and meta["metric"] not in METRICS:
        raise DataError(f"{where}: unknown metric {meta['metric']!r} (expected one of {', '.join(METRICS)})")
    return Sample(messages, where, meta)


def read_jsonl(path, *, skip_bad: bool = False) -> tuple[list[Sample], int]:
    """(samples, number skipped). Blank lines are ignored; a file without a
    usable sample is a DataError (FileNotFoundError for a missing file)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{str(path)!r} is a directory, not a JSONL data file")
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r}: no such data file")
    samples, skipped = [], 0
    with open(path, "rb") as f:  # decoded line by line, so that a bad byte is reported with its line
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); "
                                    "a JSONL file is UTF-8 text, one JSON sample per line") from None
                except ValueError as e:
                    raise DataError(f"{where}: malformed JSON ({e})") from None
                samples.append(check_sample(obj, where, path.parent))
            except DataError:
                if not skip_bad:
                    raise
                skipped += 1
    if not samples:
        raise DataError(f"{path}: no usable sample ({skipped} bad line(s) skipped)" if skipped
                        else f"{path}: the file holds no sample (it is empty)")
    return samples, skipped


def write_jsonl(samples, directory, *, name: str = "data.jsonl") -> Path:
    """Write in-memory samples (PIL images) as `directory/name` + PNG files
    under `directory/images/<name without suffix>/`; returns the JSONL path."""
    directory = Path(directory)
    out = directory / name
    images = Path("images") / Path(name).stem
    lines = []
    with atomic_directory(directory / images) as tmp:
        for i, s in enumerate(samples):
            n_img = 0

            def save(img):
                nonlocal n_img
                file = f"{i:06d}_{n_img}.png"
                img.save(tmp / file)
                n_img += 1
                return (images / file).as_posix()

            messages = []
            for m in s.messages:
                parts = []
                for p in m["content"]:
                    if p["type"] == "image" and "image" in p:
                        p = {"type": "image", "path": save(p["image"])}
                    elif p["type"] == "video":
                        p = {"type": "video", "frames": [save(x) if not isinstance(x, str) else x for x in p["frames"]]}
                    parts.append(p)
                messages.append({"role": m["role"], "content": parts})
            lines.append(json.dumps({"messages": messages, **s.meta}) + "\n")
    with atomic_file(out, encoding="utf-8") as f:
        f.writelines(lines)
    return out
