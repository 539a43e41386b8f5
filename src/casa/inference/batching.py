"""Continuous batching of decode steps across sessions: many streams for the price of one.

A decoded token is bound by memory bandwidth: it reads every weight it uses.
Sessions decoding alone read the weights once each per token; a
`DecodeBatcher` gathers the next token of every session that asks and
advances them in one step (`Session.forward_tokens`), which reads each
weight once for all of them. Sessions join and leave between steps: a
session's thread calls `forward_text([token])` as usual, and with a batcher
that call waits for the next step that includes it.

Design decisions:
- One worker thread per batcher runs the steps; it takes every token waiting
  when a step starts (at most `max_rows`), so a step never waits for a
  session that is still busy elsewhere: whoever is ready rides along, the
  rest join the next step (vLLM's and llama.cpp's continuous batching, on a
  CPU).
- Prefill (a new frame's image keys/values, a prompt's tokens) runs on the
  session's own thread, beside the steps, not inside them: it is a
  matrix-matrix product that would hold every decoding session for its whole
  length, while beside the steps it only shares the cores.
- Every session keeps its own state (caches, windows, history bound, cache
  dtype, position); rows never mix (each row's arithmetic is its own), so a
  session's logits are bit for bit those it gets alone (tested).
- Only the kernel decode path batches (`Session(decode="kernels")`); a
  session on the torch path cannot take a batcher.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from casa.core.decode import PACKED_MAX_ROWS
from casa.inference.session import Session

__all__ = ["DecodeBatcher"]


@dataclass(eq=False)
class _Row:
    session: Session
    token: int
    done: threading.Event = field(default_factory=threading.Event)
    logits: torch.Tensor | None = None
    error: BaseException | None = None


class DecodeBatcher:
    """Advances the decoded tokens of sessions over `model` together (see the module doc).

    Args:
        model: the `CasaModel` the sessions decode.
        max_rows: the most sessions one step advances.
    """

    def __init__(self, model, *, max_rows: int = PACKED_MAX_ROWS):
        if not 1 <= max_rows <= PACKED_MAX_ROWS:
            raise ValueError(f"DecodeBatcher: max_rows {max_rows}: must be in [1, {PACKED_MAX_ROWS}]")
        self.model, self.max_rows = model, max_rows
        self._cond = threading.Condition()
        self._waiting: list[_Row] = []
        self._worker: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # steps taken
        self.rows = 0  # tokens decoded (rows of all steps)

    def feed(self, session: Session, token: int) -> torch.Tensor:
        """Decode `token` in `session` in the next step; its logits `[vocab]` (blocks until then)."""
        row = _Row(session, token)
        with self._cond:
            if self._closed:
                raise RuntimeError("DecodeBatcher: closed")
            self._waiting.append(row)
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="casa-decode-batcher", daemon=True)
                self._worker.start()
            self._cond.notify()
        row.done.wait()
        if row.error is not None:
            raise row.error
        return row.logits

    def close(self) -> None:
        """Stop the worker once the steps asked for are done; later `feed`s raise."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._worker is not None:
            self._worker.join(timeout=60)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                rows = self._take()
            try:
                out = Session.forward_tokens([r.session for r in rows], [r.token for r in rows])
                for r, logits in zip(rows, out):
                    r.logits = logits
            except BaseException as e:  # noqa: BLE001 - handed to every waiting session
                for r in rows:
                    r.error = e
            finally:
                self.steps += 1
                self.rows += len(rows)
                for r in rows:
                    r.done.set()

    def _take(self) -> list[_Row]:
        """The waiting rows of this step: at most `max_rows`, one per session (a session waits
        for its own previous token anyway, so two of its rows never wait at once)."""
        rows, seen = [], set()
        for r in self._waiting:
            if len(rows) < self.max_rows and id(r.session) not in seen:
                rows.append(r)
                seen.add(id(r.session))
        taken = {id(r) for r in rows}
        self._waiting = [r for r in self._waiting if id(r) not in taken]
        return rows
