"""Generation over a `Session`: sampling, logits processors, multi-turn chat.

Design decisions:
- `generate()` samples from the logits of the last token fed, so a prompt is
  optional (a caller that just fed an image and its prompt passes none).
  Each sampled token but the last is fed back at once; the last one is fed
  too unless `commit=False`, in which case the caller feeds it with its next
  text (one forward instead of two; `Chat` does this).
- Logits processors are objects with `__call__(logits, generated)` and an
  optional `observe(token)`; they may keep state across calls. That is how
  the repetition penalty spans frames: its history is its own, not the
  current turn's.
- Order: processors, then temperature, top-k, top-p (on the processed
  logits). `temperature=0` is greedy (argmax), without randomness.
- The chat template is the built-in one of `data/processor.py`:
  `<bos> <|user|> [images] <|gist|> text <|end|> <|assistant|> reply <|end|>`
  (gist token after the images when `gist`); a turn's images share a window.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from casa.inference.session import Session


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"Sampling.max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"Sampling.temperature={self.temperature}: must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"Sampling.top_k={self.top_k}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling.top_p={self.top_p}: must be in (0, 1]")
        self.stop_tokens = tuple(int(t) for t in self.stop_tokens)


# ------------------------------------------------------------- processors
class RepetitionPenalty:
    """CTRL-style penalty on the tokens among the last `window` tokens it has
    observed (generated ones, across every turn and frame it is used for):
    positive logits are divided by `penalty`, negative ones multiplied."""

    def __init__(self, *, penalty: float = 1.2, window: int = 64, ignore: tuple[int, ...] = ()):
        if penalty < 1:
            raise ValueError(f"RepetitionPenalty.penalty={penalty}: must be >= 1")
        self.penalty, self.ignore = penalty, set(ignore)
        self.recent: deque[int] = deque(maxlen=window)
        self.counts: Counter[int] = Counter()

    def observe(self, token: int) -> None:
        if token in self.ignore:
            return
        if len(self.recent) == self.recent.maxlen:
            old = self.recent[0]
            self.counts[old] -= 1
            if not self.counts[old]:
                del self.counts[old]
        self.recent.append(token)
        self.counts[token] += 1

    def __call__(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        if not self.counts:
            return logits
        idx = torch.tensor(list(self.counts), device=logits.device)
        sel = logits[idx]
        logits = logits.clone()
        logits[idx] = torch.where(sel > 0, sel / self.penalty, sel * self.penalty)
        return logits


class EndOfTurnBias:
    """Add `bias + slope * n` to the end token's logit, `n` tokens into the
    turn (a stream wants short captions); before `min_tokens` the end token is
    forbidden."""

    def __init__(self, *, token_id: int, bias: float = 0.0, slope: float = 0.0, min_tokens: int = 0):
        self.token_id, self.bias, self.slope, self.min_tokens = int(token_id), bias, slope, min_tokens

    def __call__(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        logits = logits.clone()
        if len(generated) < self.min_tokens:
            logits[self.token_id] = float("-inf")
        else:
            logits[self.token_id] += self.bias + self.slope * len(generated)
        return logits


# ---------------------------------------------------------------- sampling
def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> int:
    """One token from `[vocab]` logits (already processed)."""
    logits = logits.float()
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.numel():
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above
        drop = before >= sampling.top_p  # the top token always stays
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Generation:
    tokens: list[int]
    stop_reason: str  # "stop_token" or "max_new_tokens"
    ttft_ms: float  # from the call to the first token (prompt prefill included)
    decode_ms: float  # from the first token to the end (last token fed included)
    committed: bool  # whether the last token is in the session's cache


def generate(session: Session, prompt_ids=(), *, sampling: Sampling | None = None, processors=(),
             generator: torch.Generator | None = None, commit: bool = True, on_token=None) -> Generation:
    """Sample up to `max_new_tokens` after `prompt_ids` (which may be empty:
    then the logits of the last token fed are used). `on_token(token)` is
    called as each token is sampled (a live stream)."""
    sampling = sampling or Sampling()
    t0 = time.perf_counter()
    if len(prompt_ids):
        logits = session.forward_text(prompt_ids)[-1]
    elif session.last_logits is not None:
        logits = session.last_logits
    else:
        raise ValueError("generate: empty prompt and nothing fed to the session yet")
    tokens: list[int] = []
    stop_reason, t_first = "max_new_tokens", None
    while True:
        for p in processors:
            logits = p(logits, tokens)
        tok = sample(logits, sampling, generator)
        tokens.append(tok)
        for p in processors:
            if hasattr(p, "observe"):
                p.observe(tok)
        if t_first is None:
            t_first = time.perf_counter()
        if on_token is not None:
            on_token(tok)
        if tok in sampling.stop_tokens:
            stop_reason = "stop_token"
            break
        if len(tokens) >= sampling.max_new_tokens:
            break
        logits = session.forward_text([tok])[-1]
    if commit:
        session.forward_text([tokens[-1]])
    t_end = time.perf_counter()
    return Generation(tokens, stop_reason, (t_first - t0) * 1e3, (t_end - t_first) * 1e3, commit)


# -------------------------------------------------------------------- chat
@dataclass
class Reply:
    text: str
    tokens: list[int]
    generation: Generation


@dataclass
class Chat:
    """Multi-turn, multi-image chat with the built-in template over one session.

    Text is buffered and fed lazily, right before an image or a generation,
    so that markup tokens never cost a forward of their own.
    """

    session: Session
    tokenizer: object
    sampling: Sampling | None = None
    processors: tuple = ()
    gist: bool = True
    generator: torch.Generator | None = None
    pending: list[int] = field(default_factory=list)
    turns: int = 0

    def __post_init__(self):
        tok = self.tokenizer
        try:
            self.ids = {name: tok.token_id(name) for name in ("<bos>", "<|user|>", "<|assistant|>", "<|end|>")}
            self.gist_id = tok.token_id("<|gist|>") if self.gist else None
        except KeyError as e:
            raise ValueError(f"Chat: the tokenizer lacks the built-in chat markup: {e}") from None
        base = self.sampling or Sampling()
        stops = {*base.stop_tokens, self.ids["<|end|>"], tok.eos_id}
        self.sampling = Sampling(base.max_new_tokens, base.temperature, base.top_k, base.top_p, tuple(stops))

    def _flush(self) -> None:
        if self.pending:
            self.session.forward_text(self.pending)
            self.pending = []

    def user(self, text: str = "", images=()) -> None:
        """Add a user turn: its images (one window), then its text."""
        if self.turns == 0 and not self.session.text_tokens:
            self.pending.append(self.ids["<bos>"])
        self.pending.append(self.ids["<|user|>"])
        if torch.is_tensor(images) or len(images := list(images)):
            self._flush()
            self._add_images(images)
            if self.gist_id is not None:
                self.pending.append(self.gist_id)
        self.pending.extend(self.tokenizer.encode(text))
        self.pending.append(self.ids["<|end|>"])
        self.turns += 1

    def _add_images(self, images) -> None:
        """Pixels `[N, C, S, S]` or embeds `[N, n, d]` (a tensor or a list of
        per-image tensors), else PIL images / arrays / paths."""
        if not torch.is_tensor(images) and all(torch.is_tensor(x) for x in images):
            images = torch.stack(images)
        if torch.is_tensor(images) and images.dim() == 3:
            self.session.add_image_embeds(images)
        else:
            self.session.add_images(images)

    def reply(self, *, on_token=None) -> Reply:
        """Generate the assistant's answer; its closing end token is fed with the next turn."""
        self.pending.append(self.ids["<|assistant|>"])
        prompt, self.pending = self.pending, []
        gen = generate(self.session, prompt, sampling=self.sampling, processors=self.processors,
                       generator=self.generator, commit=False, on_token=on_token)
        self.pending.append(gen.tokens[-1])
        if gen.stop_reason != "stop_token":  # cut short: close the turn as the template does
            self.pending.append(self.ids["<|end|>"])
        text_ids = [t for t in gen.tokens if t not in self.sampling.stop_tokens]
        return Reply(self.tokenizer.decode(text_ids), gen.tokens, gen)

    def ask(self, text: str = "", images=(), **kw) -> Reply:
        self.user(text, images)
        return self.reply(**kw)
