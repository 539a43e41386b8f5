"""`casa serve` end to end: a real uvicorn server on a free loopback port, driven
by the official `openai` client and by plain HTTP for the live-captioning
routes. Every answer is checked against the plain path on the same model:
`Chat` over a `Session` for chat, `caption_file` for live captions."""

import asyncio
import base64
import contextlib
import io
import json
import socket
import time

import httpx2 as httpx
import numpy as np
import openai
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from test_stream import encode_video

from casa.core.layout import History
from casa.core.model import CasaModel
from casa.inference.captioner import caption_file
from casa.inference.generate import Chat, Sampling
from casa.inference.live import LIVE_HISTORY
from casa.inference.session import Session
from casa.inference.writers import parse_srt
from casa.pretrained.directory import save_pretrained
from casa.pretrained.tokenizer import ByteTokenizer
from casa.serve.app import ServerThread, bind, create_app
from casa.serve.engine import Engine
from casa.serve.limits import Limits
from casa.serve.openai_api import StopText

TOK = ByteTokenizer()
MODEL = "tiny"


def make_checkpoint(path):
    """A tiny untrained casa model whose output head knows only lowercase letters: its
    replies are readable, do not end early under greedy decoding (sampling can still
    pick a zero-logit token, the end token included), and change with the text and the images."""
    torch.manual_seed(0)
    cfg = tiny_config("casa")
    cfg.lm.vocab_size, cfg.lm.tie_embeddings = TOK.vocab_size, False
    model = CasaModel(cfg)
    with torch.no_grad():
        letters = torch.zeros(TOK.vocab_size, dtype=torch.bool)
        letters[ord("a") : ord("z") + 1] = True
        model.lm_head.weight[~letters] = 0.0
    save_pretrained(model, path, tokenizer=TOK)
    return path


def image_array(seed, size=24):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def data_url(array) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    media = root / "media"
    media.mkdir()
    encode_video(media / "clip.mp4", 20)  # 2 s at 10 fps
    Image.fromarray(image_array(2)).save(media / "still.png")
    return {"checkpoint": make_checkpoint(root / MODEL), "media": media, "root": root}


@pytest.fixture(scope="module")
def server(files):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread per session is fastest on a shared machine
    engine = Engine(files["checkpoint"])
    app = create_app(engine, limits=Limits(max_sessions=2, max_queue=4, max_tokens=4096), media_dir=files["media"])
    with ServerThread(app) as url:
        yield url, app.state.casa
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(server):
    return server[1].engine.model


def reference(model, turns, *, max_tokens, temperature=0.0, top_p=1.0, seed=0):
    """The plain path: one `Chat` over one `Session`, turn by turn. `turns`: (text, images) user
    turns, each answered by the model; returns the last `Reply`."""
    chat = Chat(Session(model), TOK, sampling=Sampling(max_tokens, temperature, top_p=top_p),
                generator=torch.Generator().manual_seed(seed))
    for text, images in turns:
        reply = chat.ask(text, images)
    return reply


def wait_for(predicate, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def health(url):
    return httpx.get(url + "/health").json()


@contextlib.contextmanager
def slot_held(state):
    """Hold one session slot through the server's own admission, as a running session does."""
    asyncio.run_coroutine_threadsafe(state.acquire_slot(queue=False), state.loop).result(timeout=5)
    try:
        yield
    finally:
        state.loop.call_soon_threadsafe(state.release)


def test_keep_alive_responses_are_not_held_back(server):
    """The listening socket says it is TCP, so asyncio sets TCP_NODELAY on each connection: a
    response's head and body leave at once. With proto 0 every response after a connection's
    first waited ~40 ms (Nagle's algorithm against the client's delayed ACK)."""
    url, state = server
    sock = bind("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    sock.close()
    times = []
    with httpx.Client() as client:
        for _ in range(9):
            t0 = time.perf_counter()
            assert client.get(url + "/health").status_code == 200
            times.append(time.perf_counter() - t0)
    assert sorted(times)[4] < 0.02, times


# ----------------------------------------------------------------- chat
def test_models_and_a_greedy_chat_with_two_images(server, client, model, files):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "casa"
    image_a, image_b = image_array(1), image_array(2)  # image_b is media/still.png
    content = [{"type": "text", "text": "what changed?"},
               {"type": "image_url", "image_url": {"url": data_url(image_a)}},
               {"type": "image_url", "image_url": {"url": (files["media"] / "still.png").as_uri()}}]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                       max_tokens=12, temperature=0)
    ref = reference(model, [("what changed?", [image_a, image_b])], max_tokens=12)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("stop" if ref.generation.stop_reason == "stop_token" else "length")
    # <bos> <|user|> (2 images) <|gist|> text <|end|> <|assistant|>: 5 markup tokens, 13 text bytes
    assert r.usage.prompt_tokens == 5 + len("what changed?") + 2 * model.tokens_per_image
    assert r.usage.completion_tokens == len(ref.tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == MODEL and r.id.startswith("chatcmpl-")


def test_streaming_gives_the_same_reply_in_openai_chunks(server, client, model):
    messages = [{"role": "user", "content": "stream me"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == reference(model, [("stream me", [])], max_tokens=10).text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # the wire format itself: `data: {...}` events, then `data: [DONE]`
    with httpx.stream("POST", server[0] + "/v1/chat/completions",
                      json={"model": MODEL, "messages": messages, "max_tokens": 3, "stream": True,
                            "temperature": 0}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "chat.completion.chunk" for line in events[:-1])


def test_a_conversation_replayed_equals_one_continuing_chat(client, model):
    """The API is stateless: turns sent back with the model's own replies must
    give what a chat that kept its session gives."""
    image = image_array(3)
    first = reference(model, [("look", [image])], max_tokens=6)
    second = reference(model, [("look", [image]), ("and now?", [])], max_tokens=6)
    messages = [{"role": "user", "content": [{"type": "text", "text": "look"},
                                             {"type": "image_url", "image_url": {"url": data_url(image)}}]},
                {"role": "assistant", "content": first.text},
                {"role": "user", "content": "and now?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == second.text
    # a system message is rendered as the built-in template renders one: <|user|> text <|end|>
    with_system = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "be brief"},
                                                                        *messages], max_tokens=6, temperature=0)
    assert with_system.usage.prompt_tokens == r.usage.prompt_tokens + len("be brief") + 2


def test_sampling_parameters_and_seed(client, model):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "sample"}], max_tokens=16, temperature=0.9,
              top_p=0.8, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b == reference(model, [("sample", [])], max_tokens=16, temperature=0.9, top_p=0.8, seed=7).text
    other = reference(model, [("sample", [])], max_tokens=16, temperature=0.9, top_p=0.8, seed=8).text
    assert client.chat.completions.create(**{**kw, "seed": 8}).choices[0].message.content == other


def test_stop_strings_cut_the_reply_streamed_or_not(client, model):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=24, temperature=0)
    full = reference(model, [("hi", [])], max_tokens=24).text
    # the first two letters that do not occur earlier, two letters in or more
    cut = next(i for i in range(2, len(full) - 1) if full.find(full[i : i + 2]) == i)
    stop, expected = full[cut : cut + 2], full[:cut]
    r = client.chat.completions.create(**kw, stop=[stop, "never-seen"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, "stop")
    assert r.usage.completion_tokens == len(expected) + len(stop)  # byte tokens, up to the stop string
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stop=stop, stream=True)]
    assert "".join(pieces) == expected and not any(stop in p for p in pieces)


def test_stop_text_holds_back_a_possible_stop_string():
    s = StopText(["END"])
    sent = [s.feed(text) for text in ("ab", "abE", "abEN", "abENx", "abENxE", "abENxEND", "abENxENDzz")]
    assert sent == ["ab", "", "", "ENx", "", "", ""]
    assert s.stopped and s.text == "abENx"
    partial = StopText([])
    assert [partial.feed("h\ufffd"), partial.feed("hé"), partial.finish("hé!")] == ["h", "é", "!"]


def test_a_dropped_client_frees_its_session(server):
    url, state = server
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 4000,
            "temperature": 0}  # greedy: a sampled end token could finish the reply before we leave
    before = state.counts["chat_cancelled"]
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # a token arrived: generation is under way; now leave
    wait_for(lambda: state.counts["chat_cancelled"] == before + 1 and health(url)["sessions"] == 0,
             "the streaming generation to be cancelled")
    # the same without streaming: the request is sent, the client closes its socket
    import socket

    payload = json.dumps(body).encode()
    host, port = url[len("http://"):].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (host.encode(), port.encode(), len(payload)) + payload)
        wait_for(lambda: health(url)["sessions"] == 1, "the generation to start")
    wait_for(lambda: state.counts["chat_cancelled"] == before + 2 and health(url)["sessions"] == 0,
             "the non-streaming generation to be cancelled")
    assert state.counts["chat_cancelled"] == before + 2


# ----------------------------------------------------------- live captions
def read_events(url, session_id, *, until=None, events=None):
    """(kind, data) of a live session's event stream, until its end (or until `until(events)`),
    appended to `events` as they come (a new list if none)."""
    events = [] if events is None else events
    with httpx.stream("GET", f"{url}/live/sessions/{session_id}/events", timeout=60) as r:
        assert r.status_code == 200
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
                if kind in ("end", "failure") or (until and until(events)):
                    break
    return events


def test_live_captions_are_those_of_casa_caption(server, files, tmp_path):
    url, state = server
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "live captioning" in page.text and "/static/live.js" in page.text
    for asset in ("/", "/static/live.js"):  # nothing is fetched from anywhere but this server
        assert "http://" not in httpx.get(url + asset).text and "https://" not in httpx.get(url + asset).text
    assert httpx.get(url + "/live/config").json()["videos"] == ["clip.mp4"]
    created = httpx.post(url + "/live/sessions", json={"video": "clip.mp4", "fps": 2, "realtime": False,
                                                       "instruction": "Name the shapes."})
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    events = read_events(url, sid)
    kinds = [k for k, _ in events]
    assert kinds == ["start"] + ["frame", "caption"] * 4 + ["end"]
    frame = Image.open(io.BytesIO(base64.b64decode(events[1][1]["image"].split(",", 1)[1])))
    assert frame.format == "JPEG" and frame.size == (64, 48)  # at most 360 pixels a side: as decoded
    captions = [d for k, d in events if k == "caption"]
    assert all(c["ttft_ms"] > 0 and c["rss_bytes"] > 0 and c["cache_bytes"] > 0 for c in captions)
    srt = tmp_path / "ref.srt"
    caption_file(files["media"] / "clip.mp4", checkpoint=files["checkpoint"], fps=2, srt=srt,
                 sampling=Sampling(max_new_tokens=16), instruction="Name the shapes.")
    ref = parse_srt(srt.read_text())
    assert [c["text"] for c in captions] == [cue[3] for cue in ref]
    assert [c["time"] for c in captions] == pytest.approx([0.0, 0.5, 1.0, 1.5], abs=1e-3)
    download = httpx.get(f"{url}/live/sessions/{sid}/captions.srt")
    assert download.text == srt.read_text()
    assert download.headers["content-disposition"] == 'attachment; filename="clip.srt"'
    assert events[-1][1] == {"reason": "finished", "frames": 4, "undecodable": 0}
    assert httpx.get(f"{url}/live/sessions/{sid}").json()["state"] == "finished"


def test_upload_then_stop_frees_the_session(server, files, tmp_path):
    url, state = server
    video = (files["media"] / "clip.mp4").read_bytes()
    r = httpx.post(url + "/live/uploads", params={"fps": 2, "filename": "my clip.mp4"}, content=video)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert health(url)["live_sessions"] == 1 and len(list(state.upload_dir.iterdir())) == 1
    events = read_events(url, sid, until=lambda ev: ev[-1][0] == "caption")  # real time: 1 frame per 0.5 s
    stopped = httpx.post(f"{url}/live/sessions/{sid}/stop").json()
    assert stopped["state"] == "stopped" and 1 <= stopped["frames"] < 4
    assert health(url)["live_sessions"] == 0 and list(state.upload_dir.iterdir()) == []  # upload deleted
    cues = parse_srt(httpx.get(f"{url}/live/sessions/{sid}/captions.srt").text)
    assert len(cues) == stopped["frames"] and events[0][1]["video"] == "my clip.mp4"
    # no instruction given: the captioner's default, as `casa caption` uses it
    srt = tmp_path / "ref.srt"
    caption_file(files["media"] / "clip.mp4", checkpoint=files["checkpoint"], fps=2, srt=srt,
                 sampling=Sampling(max_new_tokens=16))
    assert cues == parse_srt(srt.read_text())[: len(cues)]


def test_a_viewer_leaving_stops_its_session(server):
    url, state = server
    sid = httpx.post(url + "/live/sessions", json={"video": "clip.mp4", "fps": 2}).json()["id"]
    read_events(url, sid, until=lambda ev: ev[-1][0] == "caption")  # then the stream is closed
    wait_for(lambda: httpx.get(f"{url}/live/sessions/{sid}").json()["state"] == "stopped", "the session to stop")
    assert health(url)["live_sessions"] == 0
    session = state.live.get(sid)
    assert session.frames is None and session.events.empty()  # decoder closed, unread frames dropped


def test_live_sessions_keep_a_bounded_history_by_default(server, monkeypatch):
    """A session's captioner has the library's bounded live history unless the session asks for the full
    one; the `start` event and the summary say which. With a small window the model state stays flat
    over 20 frames, where the full history grows by every frame's caption."""
    url, state = server
    created = httpx.post(url + "/live/sessions", json={"video": "clip.mp4"}).json()
    assert created["history"] == {"sink": LIVE_HISTORY.sink, "window": LIVE_HISTORY.window}
    assert httpx.post(f"{url}/live/sessions/{created['id']}/stop").json()["state"] == "stopped"
    monkeypatch.setattr(state.engine, "live_history", History(sink=4, window=40))
    histories, make = [], state.engine.captioner

    def spy(**kwargs):
        captioner = make(**kwargs)
        histories.append(captioner.session.history)
        return captioner

    monkeypatch.setattr(state.engine, "captioner", spy)
    caches = {}
    for history, shown in (("bounded", {"sink": 4, "window": 40}), ("full", "full")):
        r = httpx.post(url + "/live/sessions", json={"video": "clip.mp4", "fps": 10, "realtime": False,
                                                     "max_tokens": 8, "history": history})
        assert r.status_code == 201 and r.json()["history"] == shown, r.text
        events = read_events(url, r.json()["id"])
        assert events[0] == ("start", {"id": r.json()["id"], "video": "clip.mp4", "source": "video", "fps": 10.0,
                                       "history": shown})
        caches[history] = [d["cache_bytes"] for k, d in events if k == "caption"]
    assert histories == [History(sink=4, window=40), None]
    bounded, full = caches["bounded"], caches["full"]
    assert len(bounded) == len(full) == 20
    assert len(set(bounded[1:])) == 1 and bounded[-1] <= bounded[0]  # flat once the window is full
    assert all(b > a for a, b in zip(full[1:], full[2:])) and full[-1] > 4 * bounded[-1]


def test_memory_returns_to_its_baseline_after_sessions(server, client):
    """RSS after a round of chat and captioning sessions, once they end, is back
    near the RSS before it (the freed heap is handed back when idle)."""
    url, state = server

    def round_of_sessions():
        releases = state.counts["memory_releases"]
        sid = httpx.post(url + "/live/sessions", json={"video": "clip.mp4", "fps": 2, "realtime": False}).json()["id"]
        content = [{"type": "text", "text": "x"}] + [  # 8 noise images of 256x256: a 2 MiB request
            {"type": "image_url", "image_url": {"url": data_url(image_array(k, 256))}} for k in range(8)]
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=50)
        assert read_events(url, sid)[-1][0] == "end"
        wait_for(lambda: health(url)["sessions"] == 0 and state.counts["memory_releases"] > releases,
                 "the server to be idle and to hand back freed memory")
        return health(url)["rss_bytes"]

    baseline = round_of_sessions()  # warm-up: allocator pools, first-call caches
    after = [round_of_sessions() for _ in range(3)]
    peak = health(url)["peak_rss_bytes"]
    print(f"RSS baseline {baseline / 2**20:.1f} MiB, after each round {[round(a / 2**20, 1) for a in after]} MiB, "
          f"peak {peak / 2**20:.1f} MiB")
    assert max(after) - baseline < 8 * 2**20
