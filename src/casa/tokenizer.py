"""Tokenizers. The built-in one is byte-level: no vocabulary file, any text,
a vocabulary small enough for tiny CPU models.

Ids 0..255 are UTF-8 bytes; named special tokens follow. A tokenizer saves
itself into a model directory (`tokenizer_config.json`) so that a trained
model is one directory.
"""

from __future__ import annotations

import json
from pathlib import Path

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

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

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


def load_tokenizer(path):
    """The tokenizer saved in a model directory."""
    file = Path(path) / "tokenizer_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r}: no tokenizer_config.json")
    cfg = json.loads(file.read_text())
    kind = cfg.get("casa_tokenizer")
    if kind == "byte":
        return ByteTokenizer(tuple(cfg.get("specials", SPECIALS)))
    raise ValueError(f"{str(file)!r}: unknown tokenizer kind {kind!r} (this version knows 'byte')")
