"""Caption outputs: SRT and JSONL writers, SRT timestamps, a strict SRT reader.

Design decisions:
- A writer writes to `<path>.partial` beside its destination, one complete
  entry per call, flushed and synced, so that file is valid after every frame
  (follow it live with `tail -f`). The destination itself is replaced only
  by `commit()`: when the run ends, successfully or by Ctrl-C. After an
  error, `abandon()` leaves the destination as it was (an earlier good file
  is never lost) and keeps the partial file, valid, if it holds any entry.
  (`casa.files.atomic_file` does not fit: it hides the file being written and
  removes it on every exception, Ctrl-C included.)
- A live run writes `in_place`: straight to the destination, one complete
  entry per write, flushed and synced, so the file is readable while the
  stream runs (it has no end to wait for) and a kill -9 loses at most the
  entry being written; the destination's earlier content is replaced when
  the writer opens (a live run opens it at its first caption, so a source
  that fails before one leaves it as it was).
- An empty caption gets a JSONL line but no SRT cue (SRT has no empty cue:
  the model may stay silent on a frame); a caption's blank lines are
  dropped (a blank line would end the cue). A cue never starts before the
  previous one ends (a live caption's cue lasts until the model was free for
  the next frame, which may have arrived meanwhile).
- The JSONL ends with one summary line, `{"summary": true, ...}` (frames
  captioned, undecodable source frames, whether the run was interrupted;
  live runs add drops, lag percentiles, reconnections), written on commit;
  live runs also write event lines (`{"event": "reconnected", ...}`); every
  other line is one frame's caption.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

from casa.files import check_distinct, check_output_file

__all__ = ["JsonlWriter", "SRT_CUE", "SrtWriter", "check_caption_outputs", "parse_srt", "srt_time"]


def srt_time(seconds: float) -> str:
    """`HH:MM:SS,mmm`."""
    ms = max(0, int(round(seconds * 1000)))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def _cue_text(text: str) -> str:
    """A cue's text: no blank line inside (it would end the cue)."""
    lines = [line.strip() for line in text.replace("\r", "\n").split("\n")]
    return "\n".join(line for line in lines if line)


def check_caption_outputs(source, srt, jsonl) -> tuple[Path | None, Path | None]:
    """Refuse, before any work, outputs that cannot be written (a folder, a parent
    that is a file, an unwritable place) or that name the same file (each other,
    or the video). Returns `(srt, jsonl)` as paths (None where not given)."""
    srt, jsonl = check_output_file(srt, "--srt"), check_output_file(jsonl, "--jsonl")
    check_distinct(**{"the video": source, "--srt": srt, "--jsonl": jsonl})
    return srt, jsonl


class _Writer:
    """Progressive writing to `<path>.partial` (or to `path` itself, `in_place`),
    then `commit()` or `abandon()`."""

    def __init__(self, path, *, in_place: bool = False):
        self.path = Path(path)
        self.in_place = in_place
        self.partial = self.path if in_place else self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.partial, "w", encoding="utf-8")
        self.count = 0  # entries written

    def _put(self, text: str) -> None:
        self.file.write(text)  # one write per complete entry
        self.file.flush()
        os.fsync(self.file.fileno())

    def _close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def commit(self) -> Path:
        """The destination becomes what was written (atomically); returns it."""
        self._close()
        if not self.in_place:
            os.replace(self.partial, self.path)
        return self.path

    def abandon(self) -> Path | None:
        """Leave the destination untouched; return the partial file if it holds any entry
        (it is removed otherwise). In place: the file stays as written."""
        self._close()
        if self.in_place:
            return self.path
        if self.count:
            return self.partial
        self.partial.unlink(missing_ok=True)
        return None

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None or issubclass(kind, KeyboardInterrupt):
            self.commit()
        else:
            self.abandon()
        return False


class SrtWriter(_Writer):
    def __init__(self, path, *, in_place: bool = False):
        super().__init__(path, in_place=in_place)
        self.last_end = 0.0  # seconds: where the previous cue ends

    def write(self, cap) -> None:
        """One cue for a `Caption` (none for an empty caption), starting no earlier than the previous one ends."""
        text = _cue_text(cap.text)
        if text:
            start = max(cap.time, self.last_end)
            end = max(cap.end, start + 0.001)
            self._put(f"{self.count + 1}\n{srt_time(start)} --> {srt_time(end)}\n{text}\n\n")
            self.count += 1
            self.last_end = end


class JsonlWriter(_Writer):
    def write(self, cap, **extra) -> None:
        """One line for a `Caption`: its fields, an SRT-style timestamp, then `extra` fields."""
        self._put(json.dumps({"timestamp": srt_time(cap.time), **asdict(cap), **extra}, ensure_ascii=False) + "\n")
        self.count += 1

    def event(self, **fields) -> None:
        """An event line of a live run (`{"event": ..., **fields}`: a disconnection, a reconnection)."""
        self._put(json.dumps(fields, ensure_ascii=False) + "\n")

    def summary(self, **fields) -> None:
        """The closing summary line (`{"summary": true, **fields}`)."""
        self._put(json.dumps({"summary": True, **fields}, ensure_ascii=False) + "\n")


SRT_CUE = re.compile(r"(\d+)\n(\d\d:\d\d:\d\d,\d\d\d) --> (\d\d:\d\d:\d\d,\d\d\d)\n((?:[^\n]+\n)+)")


def parse_srt(text: str) -> list[tuple[int, str, str, str]]:
    """Strict SRT reader (for tests and checks): `(index, start, end, text)`
    per cue; ValueError if anything is out of place."""
    cues, pos = [], 0
    while pos < len(text):
        m = SRT_CUE.match(text, pos)
        if m is None or (m.end() < len(text) and text[m.end()] != "\n"):
            raise ValueError(f"invalid SRT at offset {pos}: {text[pos : pos + 60]!r}")
        if int(m.group(1)) != len(cues) + 1:
            raise ValueError(f"SRT cue {m.group(1)} out of sequence (expected {len(cues) + 1})")
        cues.append((int(m.group(1)), m.group(2), m.group(3), m.group(4).rstrip("\n")))
        pos = m.end() + 1
    return cues
