"""Streams decoded at once, on several threads over one model, each equal to its solo run bit for
bit: every variant, both cache dtypes, bounded history, both decode paths.

Why this can fail: casa's kernels release the GIL, so two sessions' kernel calls really overlap.
Decoding state written per token (the one-call block plan's cache pointers and rows) must
belong to the session (`core.decode.BlockSteps`); when it lived on the model, another thread
rewrote it while a kernel read it, and replies came out different or NaN. Checked by hand: with
`block_steps` patched to share one plan per model (the old behaviour), these tests fail.
"""

import threading

import pytest
import torch
from conftest import tiny_config

from casa.core import cpu_kernels
from casa.core.layout import History
from casa.core.model import CasaModel
from casa.inference.session import Session

STREAMS = 4
NEW_TOKENS = 24
VARIANTS = [("casa", "parallel"), ("casa", "before"), ("casa", "replace"), ("casa_shared", "parallel"),
            ("insertion", "parallel"), ("ca", "parallel"), ("ca_ffn", "parallel"), ("gated_ca", "parallel")]


def make_model(variant, placement, seed=0):
    torch.manual_seed(seed)
    config = tiny_config(variant, placement, **({"every": 2} if variant == "gated_ca" else {}))
    m = CasaModel(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def decode_stream(model, seed, *, history, cache_dtype, decode, batcher=None):
    """One stream: a prompt with two windows of images, then greedy tokens fed back one by one.
    Returns `(logits [steps, vocab], tokens)`: every step's logits, to compare bit for bit."""
    g = torch.Generator().manual_seed(100 + seed)
    d, vocab = model.config.lm.d_model, model.config.lm.vocab_size
    session = Session(model, history=history, cache_dtype=cache_dtype, decode=decode, batcher=batcher)
    out = []
    with torch.no_grad():
        out.append(session.forward_text(torch.randint(0, vocab, (3,), generator=g))[-1:])
        session.add_image_embeds(torch.randn(2, model.tokens_per_image, d, generator=g))
        out.append(session.forward_text(torch.randint(0, vocab, (5,), generator=g))[-1:])
        tokens = []
        for t in range(NEW_TOKENS):
            if t == NEW_TOKENS // 2:  # a second window halfway
                session.add_image_embeds(torch.randn(1, model.tokens_per_image, d, generator=g))
            token = int(out[-1][-1].argmax())
            tokens.append(token)
            out.append(session.forward_text([token]))
    return torch.cat(out), tokens


def on_threads(fns, *, together: bool):
    """Run each of `fns` on its own thread, all released at once (`together`) or one after
    another; their results in order (an exception in one is raised here)."""
    results, errors = [None] * len(fns), []
    barrier = threading.Barrier(len(fns)) if together else None

    def run(i):
        try:
            if barrier is not None:
                barrier.wait()
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
        if not together:
            t.join()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def assert_concurrent_equals_solo(model, **options):
    fns = [lambda i=i: decode_stream(model, i, **options) for i in range(STREAMS)]
    solo = on_threads(fns, together=False)
    for _ in range(2):  # twice: a race that corrupts one run in a few would still show
        together = on_threads(fns, together=True)
        for i, ((got, got_tokens), (want, want_tokens)) in enumerate(zip(together, solo)):
            assert got_tokens == want_tokens, f"stream {i}: tokens differ from its solo run"
            assert torch.equal(got, want), f"stream {i}: logits differ from its solo run"
    # the streams differ from each other: equal replies would hide a cross-stream mix-up
    assert len({tuple(tokens) for _, tokens in solo}) == STREAMS


needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: CPU kernels not built")


@needs_kernels
@pytest.mark.parametrize("variant,placement", VARIANTS)
@pytest.mark.parametrize("cache_dtype", [None, torch.int8], ids=["model", "int8"])
def test_streams_on_threads_equal_their_solo_runs(variant, placement, cache_dtype, one_thread):
    assert_concurrent_equals_solo(make_model(variant, placement), history=None, cache_dtype=cache_dtype,
                                  decode="kernels")


@needs_kernels
@pytest.mark.parametrize("variant", ["casa", "insertion", "ca"])
@pytest.mark.parametrize("cache_dtype", [None, torch.int8], ids=["model", "int8"])
def test_bounded_streams_on_threads_equal_their_solo_runs(variant, cache_dtype, one_thread):
    """A ring-buffer history that wraps several times during the run."""
    assert_concurrent_equals_solo(make_model(variant, "parallel"), history=History(sink=2, window=6),
                                  cache_dtype=cache_dtype, decode="kernels")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streams_on_the_torch_path_equal_their_solo_runs(dtype, one_thread):
    """The torch path too (its packed weights are built by whichever stream asks first, once)."""
    assert_concurrent_equals_solo(make_model("casa", "parallel").to(dtype), history=None, cache_dtype=None,
                                  decode="torch")


@needs_kernels
def test_streams_on_both_paths_at_once_equal_their_solo_runs(one_thread):
    """Sessions on the kernel path and on the torch path over one model at the same time: each
    path keeps its own packed layout, so neither rebuilds the other's under it."""
    model = make_model("casa", "parallel")
    fns = [lambda i=i: decode_stream(model, i, history=None, cache_dtype=None,
                                     decode=("kernels", "torch")[i % 2]) for i in range(STREAMS)]
    solo = on_threads(fns, together=False)
    together = on_threads(fns, together=True)
    for (got, _), (want, _) in zip(together, solo):
        assert torch.equal(got, want)


def test_the_decode_path_is_resolved_once_and_named(one_thread):
    model = make_model("casa", "parallel")
    assert Session(model, decode="torch").decode == "torch"
    expected = "kernels" if cpu_kernels.available() else "torch"
    assert Session(model).decode == expected  # "auto" at one thread
    with pytest.raises(ValueError, match=r"decode='fast': choose from \['auto', 'kernels', 'torch'\]"):
        Session(model, decode="fast")
    with pytest.raises(ValueError, match="decode='kernels': the model's dtype is torch.float16"):
        Session(make_model("casa", "parallel").half(), decode="kernels")


# ------------------------------------------------------------------ the server
def test_concurrent_chat_and_live_captions_equal_each_request_alone(tmp_path, one_thread):
    """`casa serve` with 6 chat requests and a live-captioning session in flight at once, on the
    kernel path: every reply, and every caption, equals the same request run alone on the same
    server (greedy). Before the plans belonged to sessions, 8 of 120 such replies differed."""
    import httpx2 as httpx
    from test_serve import data_url, image_array, make_checkpoint, read_events
    from test_stream import encode_video

    from casa.serve.app import ServerThread, create_app
    from casa.serve.engine import Engine
    from casa.serve.limits import Limits

    media = tmp_path / "media"
    media.mkdir()
    encode_video(media / "clip.mp4", 30)  # 3 s at 10 fps
    engine = Engine(make_checkpoint(tmp_path / "tiny"))
    assert engine.decode == ("kernels" if cpu_kernels.available() else "torch")
    app = create_app(engine, limits=Limits(max_sessions=7, max_queue=4, max_tokens=64), media_dir=media)

    def chat_body(i):
        content = [{"type": "image_url", "image_url": {"url": data_url(image_array(10 + i))}},
                   {"type": "text", "text": f"Describe picture {i}."}]
        return {"model": "tiny", "temperature": 0, "max_tokens": 24, "messages": [{"role": "user", "content": content}]}

    with ServerThread(app) as url:
        def chat(i):
            r = httpx.post(url + "/v1/chat/completions", json=chat_body(i), timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        def live():
            r = httpx.post(url + "/live/sessions", json={"video": "clip.mp4", "fps": 4, "realtime": False,
                                                         "max_tokens": 8}, timeout=60)
            assert r.status_code == 201, r.text
            events = read_events(url, r.json()["id"])
            assert events[-1][0] == "end", events[-1]
            return [data["text"] for kind, data in events if kind == "caption"]

        fns = [lambda i=i: chat(i) for i in range(6)] + [live]
        alone = on_threads(fns, together=False)
        for _ in range(2):
            assert on_threads(fns, together=True) == alone
        health = httpx.get(url + "/health").json()
    if engine.decode == "kernels":  # the sessions' tokens were batched: fewer steps than tokens
        assert health["decode_steps"] < health["decoded_tokens"]
    assert len(set(alone[:6])) == 6 and len(alone[6]) == 12  # distinct replies; a caption per frame


def test_casa_serve_offers_the_decode_paths_and_reports_the_one_taken(tmp_path, one_thread):
    import argparse

    import httpx2 as httpx
    from test_serve import make_checkpoint

    from casa.cli.serve import add_arguments
    from casa.core.decode import DECODE_PATHS
    from casa.serve.app import ServerThread, create_app
    from casa.serve.engine import Engine

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert next(a for a in parser._actions if a.dest == "decode").choices == DECODE_PATHS
    engine = Engine(make_checkpoint(tmp_path / "tiny"), decode="torch")
    with ServerThread(create_app(engine)) as url:
        assert httpx.get(url + "/health").json()["decode"] == "torch"



# --------------------------------------------------------- batched decoding
@needs_kernels
@pytest.mark.parametrize("variant,placement", VARIANTS)
@pytest.mark.parametrize("cache_dtype", [None, torch.int8], ids=["model", "int8"])
def test_streams_decoded_in_batched_steps_equal_their_solo_runs(variant, placement, cache_dtype, one_thread):
    """Sessions whose one-token steps a `DecodeBatcher` takes together (the weights read once per
    step for all of them) give the logits they give alone, bit for bit; the steps did batch."""
    from casa.inference.batching import DecodeBatcher

    model = make_model(variant, placement)
    options = dict(history=None, cache_dtype=cache_dtype, decode="kernels")
    solo = on_threads([lambda i=i: decode_stream(model, i, **options) for i in range(STREAMS)], together=False)
    batcher = DecodeBatcher(model)
    try:
        together = on_threads([lambda i=i: decode_stream(model, i, **options, batcher=batcher)
                               for i in range(STREAMS)], together=True)
    finally:
        batcher.close()
    for i, ((got, got_tokens), (want, want_tokens)) in enumerate(zip(together, solo)):
        assert got_tokens == want_tokens and torch.equal(got, want), f"stream {i}"
    assert batcher.rows == STREAMS * NEW_TOKENS and batcher.steps < batcher.rows  # rows shared steps


@needs_kernels
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_batched_bounded_streams_of_mixed_caches_equal_their_solo_runs(bf16, one_thread):
    """One batch mixes sessions with an int8 and a plain cache, bounded and full histories."""
    from casa.inference.batching import DecodeBatcher

    model = make_model("casa", "parallel")
    model = model.bfloat16() if bf16 else model
    kinds = [dict(history=History(sink=2, window=6), cache_dtype=None), dict(history=None, cache_dtype=torch.int8),
             dict(history=History(sink=1, window=5), cache_dtype=torch.int8), dict(history=None, cache_dtype=None)]
    solo = on_threads([lambda i=i: decode_stream(model, i, **kinds[i], decode="kernels") for i in range(STREAMS)],
                      together=False)
    batcher = DecodeBatcher(model)
    try:
        together = on_threads([lambda i=i: decode_stream(model, i, **kinds[i], decode="kernels", batcher=batcher)
                               for i in range(STREAMS)], together=True)
    finally:
        batcher.close()
    for (got, _), (want, _) in zip(together, solo):
        assert torch.equal(got, want)
    assert batcher.steps < batcher.rows


@needs_kernels
def test_forward_tokens_refuses_what_it_cannot_batch(one_thread):
    model = make_model("casa", "parallel")
    a, b = Session(model, decode="kernels"), Session(model, decode="torch")
    with pytest.raises(ValueError, match="distinct sessions over one model, on the kernel path"):
        Session.forward_tokens([a, b], [1, 2])
    with pytest.raises(ValueError, match="distinct sessions"):
        Session.forward_tokens([a, a], [1, 2])
    with pytest.raises(ValueError, match=r"one id in \[0, 61\) per session"):
        Session.forward_tokens([a], [61])
    with pytest.raises(ValueError, match="65 sessions, at most 64 per step"):
        Session.forward_tokens([Session(model, decode="kernels") for _ in range(65)], [1] * 65)
    from casa.inference.batching import DecodeBatcher

    with pytest.raises(ValueError, match="a batcher decodes sessions over its own model on the kernel path"):
        Session(model, decode="torch", batcher=DecodeBatcher(model))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_threads_give_the_same_bits(dtype, one_thread):
    """The kernels split work over threads only where no sum changes (output rows, heads): a model
    and a cache large enough that both splits run (their thresholds: 65536 multiply-adds)."""
    import dataclasses

    if not cpu_kernels.openmp():
        pytest.skip("kernels built without OpenMP: one thread only")
    config = tiny_config("casa")
    config = dataclasses.replace(config, lm=dataclasses.replace(config.lm, d_model=256, n_heads=4, n_kv_heads=2,
                                                                head_dim=64, d_ff=512, n_layers=2))
    torch.manual_seed(0)
    model = CasaModel(config).eval().to(dtype)
    g = torch.Generator().manual_seed(0)
    prompt, image = torch.randint(0, 61, (300,), generator=g), torch.randn(1, model.tokens_per_image, 256, generator=g)

    def run():
        session, out = Session(model, decode="kernels"), []
        with torch.no_grad():
            session.add_image_embeds(image)
            out.append(session.forward_text(prompt)[-1:])
            for _ in range(6):
                out.append(session.forward_text([int(out[-1][-1].argmax())]))
        return torch.cat(out)

    one = run()
    cpu_kernels.set_threads(2)
    try:
        assert cpu_kernels.threads() == 2
        two = run()
    finally:
        cpu_kernels.set_threads(1)
    assert torch.equal(one, two)
