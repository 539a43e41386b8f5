"""`casa chat`: talk to a model in the terminal, or answer one conversation for a script.

Interactive (the default): each line is a user turn, answered with the tokens
streamed as they come. Lines that start with `/` are commands: `/image PATH
[PATH ...]` and `/video PATH` (a video file or a folder of frames) attach to
the next turn, `/reset` starts a new conversation, `/quit` (or end of input)
leaves.

For scripts: `--messages FILE` (`-` for stdin) holds a conversation as JSON,
the usual messages shape (`[{"role": "user", "content": [{"type": "image",
"path": "x.png"}, {"type": "text", "text": "..."}]}]`, or `{"messages": [...]}`;
paths relative to the file); the reply goes to stdout, with `--json` as
`{"reply", "tokens", "stop_reason"}`.

Design decisions:
- One code path per form, both casa's own: the interactive form is
  `inference.Chat` (the session keeps the conversation; a turn costs its new
  tokens only), the script form renders the whole conversation with the
  processor (`apply_chat_template`) and calls `CasaForConditionalGeneration.generate`
  (a conversation with earlier assistant turns is rendered as training would).
  For a first turn both give the same tokens (tested).
- A bad image or video in the interactive form is one `casa: error:` line
  and the conversation goes on; in the script form it is the command's error
  (exit 2). Prompts and the banner go to stderr (only when stdin is a
  terminal), replies to stdout, so a pipe gets the replies alone.
- A video's frames are sampled at `--video-fps` (default 1) up to
  `--max-frames`, each its own window (docs/design.md §2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from casa.cli.values import non_negative_int, positive_float, positive_int, probability

__all__ = ["check", "read_messages", "register", "run"]

HELP = "commands: /image PATH [PATH ...], /video PATH (file or folder of frames), /reset, /quit"


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("chat", help="chat with a model in the terminal, or answer a messages JSON file")
    c.add_argument("--checkpoint", required=True, help="model directory or run directory (latest checkpoint)")
    c.add_argument("--messages", default=None, help="a conversation as JSON (file, or - for stdin): answer it "
                                                    "once and exit, instead of chatting")
    c.add_argument("--json", action="store_true", help="with --messages: print {reply, tokens, stop_reason}")
    c.add_argument("--max-new-tokens", type=positive_int, default=128, help='most tokens per reply')
    c.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    c.add_argument("--top-k", type=non_negative_int, default=0, help='sample from the k most likely tokens (0: all)')
    c.add_argument("--top-p", type=probability, default=1.0,
                   help='nucleus sampling: the smallest set of tokens with this much probability (1: all)')
    c.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    c.add_argument("--video-fps", type=positive_float, default=1.0, help="frames per second taken from a video")
    c.add_argument("--max-frames", type=positive_int, default=8, help="most frames taken from a video")
    c.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: the free cores)")
    c.set_defaults(func=run, check=check)


def check(args) -> None:
    """Flags, the checkpoint and the messages file, before anything heavy is imported."""
    from casa.pretrained.model_dir import read_config
    from casa.pretrained.runs import resolve_model_dir

    if args.json and args.messages is None:
        raise ValueError("--json: only with --messages (the interactive chat prints replies as they come)")
    if args.temperature < 0:
        raise ValueError(f"--temperature {args.temperature}: must be >= 0")
    read_config(resolve_model_dir(args.checkpoint))
    if args.messages is not None:
        args.conversation, args.base = read_messages(args.messages)


def read_messages(source: str) -> tuple[list, Path | None]:
    """(messages, folder their paths are relative to) of a JSON file or `-` (stdin)."""
    where = "--messages -" if source == "-" else f"--messages {source}"
    if source == "-":
        text, base = sys.stdin.read(), Path.cwd()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: no such file")
        text, base = path.read_text(encoding="utf-8"), path.parent
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    messages = obj.get("messages") if isinstance(obj, dict) else obj
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a list of messages or {{\"messages\": [...]}}")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        raise ValueError(f"{where}: the last message must be the user's (the one to answer)")
    return messages, base


# ------------------------------------------------------------------- helpers
def _frames(path, fps: float, most: int) -> list:
    """Frames of a video file or a folder of images: up to `most`, at `fps`."""
    from casa.inference.sources import open_frames

    frames = []
    for frame in open_frames(path, fps=fps):
        frames.append(frame.image)
        if len(frames) >= most:
            break
    return frames


def _videos_as_frames(messages: list, base: Path | None, args) -> list:
    """Video parts given as one path (a file or folder) replaced by their frames."""
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            parts = []
            for p in content:
                path = p.get("path", p.get("video")) if isinstance(p, dict) and p.get("type") == "video" else None
                if isinstance(path, str):
                    full = path if base is None or Path(path).is_absolute() else str(base / path)
                    p = {"type": "video", "frames": _frames(full, args.video_fps, args.max_frames)}
                parts.append(p)
            m = {**m, "content": parts}
        out.append(m)
    return out


class _Printer:
    """Prints a reply's text as its tokens come (whole characters only)."""

    def __init__(self, processor, out):
        self.processor, self.out, self.tokens, self.shown = processor, out, [], ""

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.processor.decode(self.tokens)
        if text.endswith("\ufffd"):  # a character cut in the middle of its bytes: wait for the rest
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text

    def finish(self, text: str) -> None:
        """The rest of the reply `text` (a character cut short at the end shows as U+FFFD), then a newline."""
        self.out.write(text[len(self.shown):] + "\n")
        self.out.flush()


# ----------------------------------------------------------------------- run
def run(args) -> int:
    import torch

    from casa.hub.model import CasaForConditionalGeneration
    from casa.threads import set_threads

    set_threads(args.threads)
    model = CasaForConditionalGeneration.from_pretrained(args.checkpoint)
    if model.processor is None:
        raise ValueError(f"--checkpoint {args.checkpoint}: the model was saved without a tokenizer; chat needs one")
    sampling = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                    temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                    generator=torch.Generator().manual_seed(args.seed))
    if args.messages is not None:
        return _answer(model, args, sampling)
    return _interactive(model, args, sampling)


def _answer(model, args, sampling) -> int:
    from casa.data.sample import check_messages

    processor = model.processor
    where = "--messages -" if args.messages == "-" else f"--messages {args.messages}"
    messages = check_messages(_videos_as_frames(args.conversation, args.base, args), where, args.base)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    out = model.generate(**inputs, **sampling)
    tokens = out[0, inputs.input_ids.shape[1]:].tolist()
    stopped = bool(tokens) and tokens[-1] in processor.stop_ids
    reply = processor.decode(tokens[:-1] if stopped else tokens)
    if args.json:
        print(json.dumps({"reply": reply, "tokens": tokens, "stop_reason": "stop_token" if stopped
                          else "max_new_tokens"}, ensure_ascii=False))
    else:
        print(reply)
    return 0


def _interactive(model, args, sampling) -> int:
    tty = sys.stdin.isatty()

    def new_chat():
        return model.chat(**sampling)

    chat, images, frames = new_chat(), [], []
    if tty:
        print(f"casa chat: {args.checkpoint} ({model.config.fusion.variant}); {HELP}", file=sys.stderr)
    while True:
        if tty:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return 0
        line = line.rstrip("\n")
        command, _, rest = line.partition(" ")
        try:
            if command == "/reset":
                chat, images, frames = new_chat(), [], []
                print("(new conversation)", file=sys.stderr, flush=True)
            elif command == "/image":
                images += [_image(p) for p in rest.split()] or _missing("/image PATH [PATH ...]")
            elif command == "/video":
                frames = _frames(rest.strip() or _missing("/video PATH"), args.video_fps, args.max_frames)
            elif command.startswith("/"):
                print(f"casa chat: unknown command {command!r}; {HELP}", file=sys.stderr, flush=True)
            elif line.strip() or images or frames:
                printer = _Printer(model.processor, sys.stdout)
                printer.finish(chat.ask(line, images, video=frames, on_token=printer).text)
                images, frames = [], []
        except (ValueError, FileNotFoundError) as e:
            print(f"casa: error: {e}", file=sys.stderr, flush=True)


def _missing(usage: str):
    raise ValueError(f"usage: {usage}")


def _image(path: str):
    """An image file read now, so that a bad path fails at `/image`, not at the next turn."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except Exception as e:  # noqa: BLE001 - missing, unreadable, corrupt
        raise ValueError(f"/image {path}: cannot read image: {e}") from None
