"""Generation: greedy chat equals the argmax of uncached forwards re-run on
the growing sequence; sampling filters; logits processors."""

import pytest
import torch
from conftest import tiny_config

from casa.core.batch import Batch
from casa.core.model import CasaModel
from casa.inference.generate import (
    Chat,
    EndOfTurnBias,
    NoRepeatNGram,
    RepetitionPenalty,
    Sampling,
    generate,
    sample,
)
from casa.inference.session import Session
from casa.pretrained.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def chat_model(variant="casa", placement="parallel"):
    torch.manual_seed(0)
    cfg = tiny_config(variant, placement)
    cfg.lm.vocab_size = TOK.vocab_size
    m = CasaModel(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "vision" not in name:
                p.normal_(0, 0.2)
    return m


class Recorder(Session):
    """A session that records the stream it was fed: ids and image insertion points."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.ids, self.points, self.embeds = [], [], []

    def forward_text(self, ids):
        self.ids.extend(int(i) for i in torch.as_tensor(ids).reshape(-1))
        return super().forward_text(ids)

    def add_image_embeds(self, embeds):
        embeds = embeds if embeds.dim() == 3 else embeds[None]
        self.points.extend([len(self.ids)] * embeds.shape[0])
        self.embeds.extend(embeds)
        return super().add_image_embeds(embeds)


def uncached_next(m, s: Recorder, upto: int) -> int:
    keep = [i for i, p in enumerate(s.points) if p < upto]
    embeds = torch.stack([s.embeds[i] for i in keep]) if keep else torch.zeros(0, 4, 32)
    batch = Batch(torch.tensor([s.ids[:upto]]), image_embeds=embeds,
                  insertion_points=torch.tensor([s.points[i] for i in keep], dtype=torch.long))
    with torch.no_grad():
        return int(m(batch, backend="reference")[0, -1].argmax())


@pytest.mark.parametrize("variant", ["insertion", "ca", "ca_shared", "casa", "casa_shared", "ca_ffn", "gated_ca"])
def test_greedy_chat_equals_uncached_argmax(variant):
    m = chat_model(variant)
    s = Recorder(m)
    chat = Chat(s, TOK, sampling=Sampling(max_new_tokens=5))
    g = torch.Generator().manual_seed(0)
    img = lambda: torch.randn(4, 32, generator=g)  # noqa: E731
    replies, starts, turns = [], [], []
    for text, images in [("hi", []),  # text before the first image
                         ("two", [img(), img()]),  # two images sharing a window
                         ("", [img()]), ("and?", [])]:
        replies.append(chat.ask(text, images=images))
        starts.append(len(s.ids) - len(replies[-1].tokens) + 1)  # its last token is still pending
        turns.append((text, images))
    bye = chat.ask("bye")  # the last reply's closing markup reaches the cache
    checked = 0
    end = TOK.token_id("<|end|>")
    for r, start in zip(replies, starts):
        stopped = r.generation.stop_reason == "stop_token"
        ids = r.tokens[:-1] if stopped else r.tokens
        closing = r.tokens[-1] if stopped else end  # the end of turn the model emitted, else the template's
        assert s.ids[start : start + len(ids) + 1] == ids + [closing]  # the reply, then the closing
        for j, tok in enumerate(r.tokens):
            assert uncached_next(m, s, start + j) == tok
            checked += 1
    assert checked == sum(len(r.tokens) for r in replies) >= 10  # a random model may stop early
    # the stream is the processor's rendering of the whole conversation (replies as generated)
    messages = []
    for (text, images), r in zip(turns, replies):
        ids = r.tokens[:-1] if r.generation.stop_reason == "stop_token" else r.tokens
        content = [{"type": "image", "image": x} for x in images] + ([{"type": "text", "text": text}] if text else [])
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "ids", "ids": ids}]}]
    messages.append({"role": "user", "content": [{"type": "text", "text": "bye"}]})
    full = chat.processor.tokenize(chat.processor.render(messages, generation_prompt=True))
    emitted = list(full.ids)  # with the stop tokens the model emitted where the template closes its replies
    for r, start in zip(replies, starts):
        if r.generation.stop_reason == "stop_token":
            emitted[start + len(r.tokens) - 1] = r.tokens[-1]
    assert s.ids == emitted + bye.tokens[:-1]
    assert s.points == full.points
    assert s.ids[:2] == [TOK.token_id("<bos>"), TOK.token_id("<|user|>")]
    assert s.points[0] == s.points[1] and s.ids[s.points[0]] == TOK.token_id("<|gist|>")


def test_generate_stop_tokens_max_tokens_and_commit():
    m = chat_model()
    s = Session(m)
    s.forward_text([1, 2, 3])
    first = int(s.last_logits.argmax())
    gen = generate(s, sampling=Sampling(max_new_tokens=4), commit=False)
    assert gen.stop_reason == "max_new_tokens" and len(gen.tokens) == 4 and gen.tokens[0] == first
    assert s.text_tokens == 3 + 3  # the last token is not fed
    stop = gen.tokens[-1]
    gen2 = generate(Session(m), [1, 2, 3], sampling=Sampling(max_new_tokens=4, stop_tokens=(stop,)))
    assert gen2.tokens == gen.tokens[: gen.tokens.index(stop) + 1] and gen2.stop_reason == "stop_token"
    assert gen2.ttft_ms > 0 and gen2.decode_ms > 0 and gen2.committed  # decode time includes the commit forward
    with pytest.raises(ValueError, match="nothing fed"):
        generate(Session(m))


def test_sampling_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {sample(logits, Sampling(temperature=1.0, **kw), g) for _ in range(300)}  # noqa: E731
    assert draws() == {0, 1, 2, 3}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.5) == {0}
    assert draws(top_p=0.8) == {0, 1}
    assert draws(top_k=3, top_p=0.99) == {0, 1, 2}
    assert sample(logits, Sampling(temperature=0)) == 0
    hot = {sample(logits, Sampling(temperature=50.0), g) for _ in range(300)}
    assert hot == {0, 1, 2, 3}
    a = [sample(logits, Sampling(temperature=1.0), torch.Generator().manual_seed(3)) for _ in range(5)]
    b = [sample(logits, Sampling(temperature=1.0), torch.Generator().manual_seed(3)) for _ in range(5)]
    assert a == b
    with pytest.raises(ValueError):
        Sampling(top_p=0)


def test_repetition_penalty_spans_frames():
    m = chat_model()
    pen = RepetitionPenalty(penalty=1e6, window=100)
    s = Session(m)
    chat = Chat(s, TOK, sampling=Sampling(max_new_tokens=6), processors=(pen,))
    g = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(4):  # one frame per turn
        r = chat.ask("", images=[torch.randn(4, 32, generator=g)])
        seen.extend(r.tokens)
    # a huge penalty over a window that spans frames: no token is generated twice
    assert len(seen) == len(set(seen))
    # the window is a real bound: an old token leaves the penalty set
    small = RepetitionPenalty(penalty=2.0, window=2)
    for t in (5, 6, 7):
        small.observe(t)
    logits = torch.ones(10)
    out = small(logits, [])
    assert out[5] == 1 and out[6] == 0.5 and out[7] == 0.5
    assert small(-logits, [])[7] == -2


def test_no_repeat_ngram_spans_frames_not_turn_boundaries():
    block = NoRepeatNGram(n=2, window=8, ignore=(99,))

    def turn(tokens):  # as `generate` calls it: before each token, then observe
        banned = []
        for i, t in enumerate(tokens):
            out = block(torch.zeros(100), tokens[:i])
            banned.append({int(j) for j in torch.nonzero(out.isinf()).flatten()})
            block.observe(t)
        return banned

    assert turn([1, 2, 3, 99]) == [set(), set(), set(), set()]  # the stop token is not recorded
    # the next frame: after 1, the 2 of "1 2" is forbidden; "3 4" never ran across the turns
    assert turn([1, 5, 3]) == [set(), {2}, set()]
    assert turn([3, 4]) == [set(), set()]
    for t in range(10, 20):  # the window is a bound: 10 tokens later "1 2" is forgotten
        block.observe(t)
    assert not block(torch.zeros(100), [1]).isinf().any() and block(torch.zeros(100), [1]).shape == (100,)
    assert len(block.recent) == 7 and sum(sum(c.values()) for c in block.follow.values()) == 7
    with pytest.raises(ValueError, match="n=0"):
        NoRepeatNGram(n=0)
    # in a chat over frames: no bigram of the generated text comes back in a later frame
    m = chat_model()
    chat = Chat(Session(m), TOK, sampling=Sampling(max_new_tokens=6), processors=(NoRepeatNGram(n=2, window=100),))
    g = torch.Generator().manual_seed(0)
    grams = []
    for _ in range(4):
        r = chat.ask("", images=[torch.randn(4, 32, generator=g)])
        ids = r.tokens[:-1] if r.generation.stop_reason == "stop_token" else r.tokens
        grams += list(zip(ids, ids[1:]))
    assert len(grams) >= 8 and len(grams) == len(set(grams))


class ForceAt:
    """A logits processor that forces `token` as the `at`-th token of every turn."""

    def __init__(self, token, at):
        self.token, self.at = token, at

    def __call__(self, logits, generated):
        if len(generated) != self.at:
            return logits
        out = torch.full_like(logits, float("-inf"))
        out[self.token] = 0
        return out


@pytest.mark.parametrize("stop", ["<eos>", "<|end|>"])
def test_the_end_of_turn_fed_back_is_the_one_the_model_emitted(stop):
    m = chat_model()
    s = Recorder(m)
    token = TOK.token_id(stop)
    chat = Chat(s, TOK, sampling=Sampling(max_new_tokens=6), processors=(ForceAt(token, 2),))
    r = chat.ask("x")
    assert r.generation.stop_reason == "stop_token" and r.tokens[-1] == token and len(r.tokens) == 3
    start = len(s.ids) - 2  # the reply's two tokens were fed; the stop token was not
    chat.ask("y")
    assert s.ids[start : start + 3] == r.tokens  # the reply, then the stop token the model emitted
    assert chat.processor.end_of_turn_id == TOK.token_id("<|end|>")  # what the template alone would feed
    assert s.ids[start + 3] == TOK.token_id("<|user|>")  # then the rest of the template's markup


def test_end_of_turn_bias():
    m = chat_model()
    end = TOK.token_id("<|end|>")
    chat = Chat(Session(m), TOK, sampling=Sampling(max_new_tokens=6),
                processors=(EndOfTurnBias(token_id=end, bias=1e4, min_tokens=3),))
    r = chat.ask("x")
    assert r.tokens[-1] == end and len(r.tokens) == 4  # forbidden for 3 tokens, then forced
    chat2 = Chat(Session(m), TOK, sampling=Sampling(max_new_tokens=6),
                 processors=(EndOfTurnBias(token_id=end, slope=-1e4),))
    assert end not in chat2.ask("x").tokens[1:]
    assert EndOfTurnBias(token_id=1, bias=1.0, slope=0.5)(torch.zeros(3), [7, 7])[1] == 2.0


def test_chat_needs_markup_tokens():
    class Plain:
        eos_id = 0

        def token_id(self, name):
            raise KeyError(name)

    with pytest.raises(ValueError, match="chat markup"):
        Chat(Session(chat_model()), Plain())


def test_chat_image_inputs_agree():
    """An image given as an array, as its pixels, or as its embeddings is one image."""
    import numpy as np

    from casa.vision.preprocess import preprocess

    m = chat_model()
    img = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    pixels = preprocess([img], m.config.vision)
    with torch.no_grad():
        embeds = m.vision(pixels)
    replies = []
    for images in ([img], pixels, list(pixels), embeds, list(embeds)):
        chat = Chat(Session(m), TOK, sampling=Sampling(max_new_tokens=4))
        r = chat.ask("what?", images=images)
        replies.append((r.tokens, chat.session.images, chat.session.kv_tokens()))
    assert all(r == replies[0] for r in replies) and replies[0][1] == 1
