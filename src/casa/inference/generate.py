"""Generation over a `Session`: sampling, logits processors, multi-turn chat.

Design decisions:
- `generate()` samples from the logits of the last token fed, so a prompt is
  optional (a caller that just fed an image and its prompt passes none).
  Each sampled token but the last is fed back at once; the last one is fed
  too unless `commit=False`, in which case the caller feeds it with its next
  text (one forward instead of two; `Chat` does this).
- Logits processors are objects with `__call__(logits, generated)` and an
  optional `observe(token)`; they may keep state across calls. That is how
  the repetition penalty and the no-repeat n-gram blocker span frames: their
  history is their own (bounded), not the current turn's.
- Order: processors, then temperature, top-k, top-p (on the processed
  logits). `temperature=0` is greedy (argmax), without randomness.
- `Chat` renders turns with the model's own processor
  (`data.Processor.encode_continuation`): the chat template of its tokenizer
  (or the built-in one), with the image markers and gist token it was
  trained with, exactly as training and evaluation render them. A turn's
  images share a window; a turn's video frames (`user(video=...)`, a video
  part) get one window each, each closed by the gist token (docs/design.md
  §2): the processor decides, `feed` feeds each insertion point's images
  together. Generated replies are fed as generated (never
  re-tokenised); a reply's stop token is not fed by itself: the template's
  closing markup is, as in training, with its end-of-turn token replaced by
  the stop token the model emitted when they differ (a model that ended on
  its EOS token finds that token in its cache, not one it did not say).
- Chat stops at the processor's stop tokens (`Processor.stop_ids`), the
  same set evaluation stops at.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass

import torch

from casa.data.processor import Processor
from casa.inference.session import Session
from casa.vision.dynamic import preprocess_images

__all__ = ["Chat", "EndOfTurnBias", "Generation", "NoRepeatNGram", "RepetitionPenalty", "Reply", "Sampling", "feed",
           "generate", "sample"]


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


class NoRepeatNGram:
    """Forbid a token that would complete an `n`-gram already generated, in this
    turn or an earlier one (the frames of a stream), among the n-grams of the
    last `window` tokens it has observed. n-grams do not cross turns (a turn
    starts where `generated` is empty); tokens of `ignore` (stop tokens) are
    not recorded."""

    def __init__(self, *, n: int = 3, window: int = 256, ignore: tuple[int, ...] = ()):
        if n < 1:
            raise ValueError(f"NoRepeatNGram.n={n}: must be >= 1")
        if window < n:
            raise ValueError(f"NoRepeatNGram.window={window}: must be >= n ({n})")
        self.n, self.ignore = n, set(ignore)
        self.recent: deque[tuple[int, ...]] = deque(maxlen=window - n + 1)  # n-grams, oldest first
        self.follow: dict[tuple[int, ...], Counter[int]] = {}  # (n-1)-gram -> tokens seen after it
        self.turn: list[int] = []  # this turn's tokens (the last n - 1 are enough)

    def observe(self, token: int) -> None:
        if token in self.ignore:
            return
        self.turn = [*self.turn[-(self.n - 1):], token] if self.n > 1 else [token]
        if len(self.turn) < self.n:
            return
        if len(self.recent) == self.recent.maxlen:
            old = self.recent[0]
            after = self.follow[old[:-1]]
            after[old[-1]] -= 1
            if not after[old[-1]]:
                del after[old[-1]]
                if not after:
                    del self.follow[old[:-1]]
        gram = tuple(self.turn[-self.n:])
        self.recent.append(gram)
        self.follow.setdefault(gram[:-1], Counter())[gram[-1]] += 1

    def __call__(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        if not generated:
            self.turn = []  # a new turn: n-grams do not run across turns
        banned = self.follow.get(tuple(self.turn[-(self.n - 1):]) if self.n > 1 else ())
        if not banned or len(self.turn) < self.n - 1:
            return logits
        logits = logits.clone()
        logits[list(banned)] = float("-inf")
        return logits


class EndOfTurnBias:
    """Add `bias + slope * n` to the end token's logit, `n` tokens into the
    turn (a stream wants short captions); before `min_tokens` the end token,
    and every token of `stop_ids`, is forbidden."""

    def __init__(self, *, token_id: int, bias: float = 0.0, slope: float = 0.0, min_tokens: int = 0,
                 stop_ids: tuple[int, ...] = ()):
        self.token_id, self.bias, self.slope, self.min_tokens = int(token_id), bias, slope, min_tokens
        self.forbidden = sorted({self.token_id, *map(int, stop_ids)})

    def __call__(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        logits = logits.clone()
        if len(generated) < self.min_tokens:
            logits[self.forbidden] = float("-inf")
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
    if not hasattr(session, "forward_text"):
        raise TypeError(f"generate: expected a casa.Session (one stream's state), got {type(session).__name__}; "
                        "pass casa.Session(model), e.g. casa.generate(casa.Session(model), ids), or call "
                        "model.generate(input_ids) on a casa.CasaForConditionalGeneration")
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


def feed(session: Session, ids, images, points) -> list[int]:
    """Feed text `ids` to `session` with `images` inserted before text index `points` (sorted;
    images at one point share a window), up to the last image; returns the ids after it (the
    prompt of the generation that follows, fed by `generate`).

    Args:
        ids: token ids (a list or 1-D tensor).
        images: one per point, each `[C, S, S]` pixels, a `[C, H, W]` / `[F, C, H, W]` item
            (dynamic resolution) or `[n, d]` LM-width tokens.
        points: each image's insertion point, in `[0, len(ids)]`.
    """
    ids, points, fed, i = [int(t) for t in ids], [int(p) for p in points], 0, 0
    in_range = not points or 0 <= points[0] <= points[-1] <= len(ids)
    if len(images) != len(points) or points != sorted(points) or not in_range:
        raise ValueError(f"feed: {len(images)} images at points {points[:10]}: expected one sorted point per "
                         f"image, within [0, {len(ids)}]")
    while i < len(points):
        j = i
        while j < len(points) and points[j] == points[i]:
            j += 1
        if points[i] > fed:
            session.forward_text(ids[fed : points[i]])
            fed = points[i]
        group = list(images[i:j])
        if group[0].dim() == 2:  # [n, d] each: LM-width image tokens
            same = all(x.shape == group[0].shape for x in group)
            session.add_image_embeds(torch.stack(group) if same else group)
        elif session.config.vision.dynamic:  # items of their own sizes
            session.add_images(group)
        else:
            session.add_images(torch.stack(group))
        i = j
    return ids[fed:]


# -------------------------------------------------------------------- chat
@dataclass
class Reply:
    text: str
    tokens: list[int]
    generation: Generation


class Chat:
    """Multi-turn, multi-image chat over one session, rendered with the model's processor.

    Args:
        session: a fresh `Session` (the chat starts the conversation).
        processor: the model's `data.Processor` (`casa.load(dir).processor`), or
            a bare tokenizer for the built-in template with its default markup.
        sampling: sampling settings; the processor's stop tokens are added.
        processors: logits processors (`RepetitionPenalty`, `EndOfTurnBias`, ...).
        generator: random generator for sampling.

    `user()` only records a turn (its images are preprocessed at once, so a bad
    image fails there); `reply()` feeds everything new (the last reply's
    closing markup, the new turns, the assistant's opening) and generates:
    markup never costs a forward of its own.
    """

    def __init__(self, session: Session, processor, *, sampling: Sampling | None = None, processors=(),
                 generator: torch.Generator | None = None):
        if processor is None:
            raise ValueError("Chat: no processor; give the model's processor (casa.load(dir).processor or "
                             "casa.load_processor(dir)); a model saved without a tokenizer has none")
        if not isinstance(processor, Processor):
            try:
                processor = Processor(processor, session.config.vision)
            except KeyError as e:
                raise ValueError(f"Chat: the tokenizer lacks the built-in chat markup ({e}); "
                                 "give the model's processor (casa.load(dir).processor)") from None
        self.session = session
        self.processor = processor
        self.tokenizer = processor.tok
        self.processors = tuple(processors)
        self.generator = generator
        base = sampling or Sampling()
        stops = {*base.stop_tokens, *processor.stop_ids}
        self.sampling = Sampling(base.max_new_tokens, base.temperature, base.top_k, base.top_p, tuple(sorted(stops)))
        # The last exchange fed (user turns, then the reply as its generated ids): all that the
        # next continuation is rendered against, so memory does not grow with the conversation.
        self.last_exchange: list[dict] = []
        self.new: list[dict] = []  # messages recorded, not fed yet
        self.unfed: list[int] = []  # the last reply's final token, when it was not a stop token
        self.stopped: int | None = None  # the stop token that ended the last reply (not fed yet)
        self.turns = 0

    def user(self, text: str = "", images=(), *, video=()) -> None:
        """Add a user turn: its images (one window), its video's frames (one window
        each, a gist token after each), then its text.

        Args:
            images: PIL images / uint8 arrays / paths (preprocessed now), float
                pixels `[N, C, S, S]` or embeds `[N, n, d]` (a tensor or a list
                of per-image tensors; with dynamic resolution, `[C, H, W]` items
                of their own sizes).
            video: the frames of one clip, in order, in any form `images` takes
                (a processor without a gist token refuses them: ValueError).
        """
        images, frames = self._pixels(images), self._pixels(video)
        parts = [{"type": "image", "image": img} for img in images]
        if frames:
            self.processor.check_video("Chat.user(video=...)")
            parts.append({"type": "video", "frames": frames})
        if text:
            parts.append({"type": "text", "text": text})
        self.new.append({"role": "user", "content": parts})
        self.turns += 1

    def _pixels(self, images) -> list:
        """Images as tensors: preprocessed now unless they already are (so a bad image fails here)."""
        images = list(images)
        if images and not all(torch.is_tensor(x) for x in images):
            images = list(preprocess_images(images, self.session.config.vision))  # [C, H, W] each
        return images

    def _feed(self, enc) -> list[int]:
        """Feed a continuation's ids with its images at their insertion points;
        returns the ids after the last image (the caller's prompt)."""
        ids = self.unfed + enc.ids
        if self.stopped is not None and enc.ids and enc.ids[0] != self.stopped and enc.ids[0] == self._end_of_turn():
            ids[len(self.unfed)] = self.stopped  # the end of turn the model emitted, not the template's
        points = [p + len(self.unfed) for p in enc.points]
        self.unfed, self.stopped = [], None
        return feed(self.session, ids, enc.images, points)

    def _end_of_turn(self) -> int | None:
        """The template's end-of-turn token (None when it puts nothing after a reply)."""
        try:
            return self.processor.end_of_turn_id
        except ValueError:
            return None

    def reply(self, *, on_token=None) -> Reply:
        """Generate the assistant's answer to the turns added since the last reply."""
        if not self.new:
            raise ValueError("Chat.reply: no new user turn")
        prompt = self._feed(self.processor.encode_continuation(self.last_exchange, self.new))
        gen = generate(self.session, prompt, sampling=self.sampling, processors=self.processors,
                       generator=self.generator, commit=False, on_token=on_token)
        reply_ids = gen.tokens[:-1] if gen.stop_reason == "stop_token" else gen.tokens
        if gen.stop_reason != "stop_token":  # cut short: its last token is not in the cache yet
            self.unfed = [gen.tokens[-1]]
        else:
            self.stopped = gen.tokens[-1]
        self.last_exchange = [*self.new, {"role": "assistant", "content": [{"type": "ids", "ids": reply_ids}]}]
        self.new = []
        return Reply(self.tokenizer.decode(reply_ids), gen.tokens, gen)

    def ask(self, text: str = "", images=(), *, video=(), **kw) -> Reply:
        self.user(text, images, video=video)
        return self.reply(**kw)
