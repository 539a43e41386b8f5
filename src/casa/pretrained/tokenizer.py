"""Tokenizers. The built-in one is byte-level: no vocabulary file, any text,
a vocabulary small enough for tiny CPU models.

Ids 0..255 are UTF-8 bytes; named special tokens follow. A tokenizer saves
itself into a model directory (`tokenizer_config.json`) so that a trained
model is one directory.

`HFTokenizer` wraps any transformers / `tokenizers` tokenizer read from a local
directory (its `tokenizer.json`, special tokens and jinja chat template).
Both expose the same small interface the data processor needs: `encode(text,
specials=...)`, `decode`, `token_id`, `pad_id`, `eos_id`, `vocab_size`, `save`.

Design decisions:
- Duck typing, no base class: the processor needs seven members, and a
  tokenizer from elsewhere that has them works.
- Never a download: `HFTokenizer` reads a local directory only
  (`local_files_only`), so training and evaluation run offline.
- `load_tokenizer` dispatches on the file a tokenizer saved (`casa_tokenizer`
  kind), and reads a bare HF tokenizer directory too; its JSON files are read
  with `casa.files.read_json`, so a damaged one is named.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from casa.files import read_json

__all__ = ["SPECIALS", "ByteTokenizer", "HFTokenizer", "has_tokenizer", "load_tokenizer"]

SPECIALS = ("<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>", "<|image|>", "<|gist|>")


class ByteTokenizer:
    kind = "byte"

    def __init__(self, specials: tuple[str, ...] = SPECIALS):
        self.specials = tuple(specials)
        self._special_ids = {s: 256 + i for i, s in enumerate(self.specials)}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.specials)

    def token_id(self, special: str) -> int:
        if special not in self._special_ids:
            raise KeyError(f"tokenizer has no special token {special!r}; it has {list(self.specials)}")
        return self._special_ids[special]

    @property
    def pad_id(self) -> int:
        return self.token_id("<pad>")

    @property
    def eos_id(self) -> int:
        return self.token_id("<eos>")

    def encode(self, text: str, *, specials: bool = False) -> list[int]:
        """UTF-8 bytes; with `specials`, names of special tokens in `text`
        (e.g. "<|user|>") become their ids (the chat template relies on it)."""
        if not specials:
            return list(text.encode("utf-8"))
        out = []
        for piece in self._special_re().split(text):
            if piece in self._special_ids:
                out.append(self._special_ids[piece])
            elif piece:
                out.extend(piece.encode("utf-8"))
        return out

    def _special_re(self):
        if not hasattr(self, "_re"):
            names = sorted(self.specials, key=len, reverse=True)
            self._re = re.compile("(" + "|".join(re.escape(s) for s in names) + ")")
        return self._re

    def decode(self, ids, *, skip_special: bool = True) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special:
                out.append(self.specials[i - 256])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def save(self, path) -> None:
        cfg = {"casa_tokenizer": self.kind, "specials": list(self.specials)}
        (Path(path) / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


class HFTokenizer:
    """A transformers tokenizer from a local directory (never downloads).

    `encode(text, specials=True)` lets the tokenizer parse its added/special
    tokens inside `text`, which is how a rendered chat template is read;
    `specials=False` is for plain user text. `chat_template` is the
    directory's jinja template (None if it has none). `save` copies the
    tokenizer files into a model directory.
    """

    kind = "hf"
    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")

    def __init__(self, path):
        from transformers import AutoTokenizer

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
        try:
            self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise ValueError(f"cannot load a tokenizer from {str(path)!r}: {e}") from e

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tok, "chat_template", None)

    def token_id(self, special: str) -> int:
        i = self.tok.convert_tokens_to_ids(special)
        if i is None or i == self.tok.unk_token_id and special != self.tok.unk_token:
            raise KeyError(f"tokenizer {str(self.path)!r} has no token {special!r}")
        return int(i)

    @property
    def pad_id(self) -> int:
        pad = self.tok.pad_token_id
        return int(pad if pad is not None else self.eos_id)

    @property
    def eos_id(self) -> int:
        if self.tok.eos_token_id is None:
            raise KeyError(f"tokenizer {str(self.path)!r} has no eos token")
        return int(self.tok.eos_token_id)

    def encode(self, text: str, *, specials: bool = False) -> list[int]:
        if specials:
            return list(self.tok.encode(text, add_special_tokens=False))
        return list(self.tok.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, ids, *, skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        """The directory's chat template applied to `messages` (string contents)."""
        if not self.chat_template:
            raise ValueError(f"tokenizer {str(self.path)!r} has no chat template")
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def save(self, path) -> None:
        dest = Path(path) / "hf_tokenizer"
        self.tok.save_pretrained(str(dest))
        cfg = {"casa_tokenizer": self.kind, "path": "hf_tokenizer"}
        (Path(path) / "casa_tokenizer.json").write_text(json.dumps(cfg, indent=2))


def has_tokenizer(path) -> bool:
    """Whether directory `path` holds a saved tokenizer (casa's, or a bare HF tokenizer's files)."""
    path = Path(path)
    return (path / "casa_tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def load_tokenizer(path):
    """The tokenizer saved in a model directory (or a bare HF tokenizer directory)."""
    path = Path(path)
    casa_file = path / "casa_tokenizer.json"
    if casa_file.is_file():  # written by HFTokenizer.save
        saved = read_json(casa_file)
        if not isinstance(saved, dict) or not isinstance(saved.get("path"), str):
            raise ValueError(f"{str(casa_file)!r}: expected {{\"path\": <tokenizer directory>}}")
        return HFTokenizer(path / saved["path"])
    file = path / "tokenizer_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r}: no tokenizer_config.json")
    cfg = read_json(file)
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(file)!r}: expected a JSON object")
    kind = cfg.get("casa_tokenizer")
    if kind == "byte":
        return ByteTokenizer(tuple(cfg.get("specials", SPECIALS)))
    if kind is None and (path / "tokenizer.json").is_file():
        return HFTokenizer(path)
    raise ValueError(f"{str(file)!r}: unknown tokenizer kind {kind!r} (this version knows 'byte' and 'hf')")
