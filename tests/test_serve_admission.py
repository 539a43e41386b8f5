"""`casa serve` admits before it works: a chat request takes its slot (or queue
place) before its images are decoded or its text tokenized, a text too long
is refused by its length alone, images by their headers; a live session holds
a slot only while its viewer is connected; an upload takes its place before
its body is read, and its body has a deadline. One real server for the
module, one slot, small places, a one-second body deadline."""

import base64
import contextlib
import io
import json
import logging
import socket
import threading
import time
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_bad_input_serve import GOOD, assert_refused, assert_still_serving, chat, image_message
from test_serve import MODEL, health, make_checkpoint, read_events, slot_held, wait_for
from test_stream import encode_video

from casa.serve import openai_api
from casa.serve.app import ServerThread, create_app
from casa.serve.engine import Engine
from casa.serve.limits import MAX_CHARS_PER_TOKEN, Limits
from casa.serve.memory import peak_rss_bytes, rss_bytes

LIMITS = Limits(max_sessions=1, max_queue=1, queue_timeout=10, max_tokens=16, max_prompt_tokens=2000,
                max_request_pixels=3 * 1024 * 1024, max_pending_live=2, max_uploads=1, max_upload_mb=1,
                body_timeout=1.0, connect_timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_admission")
    media = root / "media"
    media.mkdir()
    encode_video(media / "clip.mp4", 20)  # 2 s at 10 fps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    app = create_app(Engine(make_checkpoint(root / MODEL)), limits=LIMITS, media_dir=media)
    with ServerThread(app) as url:
        yield url, app.state.casa
    torch.set_num_threads(threads)


@pytest.fixture
def counted(server, monkeypatch):
    """How often the server decoded images and tokenized a conversation."""
    state = server[1]
    calls = {"load_images": 0, "prompt_tokens": 0}

    def counting(name, fn):
        def wrapper(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)
        return wrapper

    monkeypatch.setattr(openai_api, "load_images", counting("load_images", openai_api.load_images))
    monkeypatch.setattr(state.engine, "prompt_tokens", counting("prompt_tokens", state.engine.prompt_tokens))
    return calls


@contextlib.contextmanager
def peak_rss_reset():
    """Reset this process's peak resident set (Linux `clear_refs`); yields a function giving the
    growth of the peak over the resident set at the reset, in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    start = rss_bytes()
    yield lambda: peak_rss_bytes() - start


def png_url(width, height) -> str:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")  # black: a few KiB for millions of pixels
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def raw_request(url, head: str, body: bytes = b"") -> socket.socket:
    """A socket that has sent `head` (request line and headers, Host added) and `body`."""
    host, port = url[len("http://"):].split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(head.replace("\n", "\r\n").encode() + f"Host: {host}:{port}\r\n\r\n".encode() + body)
    return sock


def response_of(sock) -> tuple[int, str]:
    """(status, whole response text) read until the server closes or sends a complete JSON body."""
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data.decode("utf-8", "replace")


# ------------------------------------------------------------------- chat
def test_a_queued_request_decodes_and_tokenizes_nothing_until_it_has_a_slot(server, counted):
    url, state = server
    content = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": png_url(32, 32)}}]
    queued: list = []
    with slot_held(state):
        waiter = threading.Thread(target=lambda: queued.append(chat(url, {**GOOD, "messages": [
            {"role": "user", "content": content}]})))
        waiter.start()
        wait_for(lambda: state.admission.queued == 1, "the request to be queued")
        time.sleep(0.2)
        assert counted == {"load_images": 0, "prompt_tokens": 0}  # queued: nothing decoded or tokenized
        # the queue is full: a request whose image cannot even be decoded is refused for that, not for its image
        assert_refused(chat(url, image_message("data:image/png;base64,aGVsbG8=")), 429, "--max-queue 1")
        assert counted == {"load_images": 0, "prompt_tokens": 0}
    waiter.join()
    assert queued[0].status_code == 200, queued[0].text
    assert counted == {"load_images": 1, "prompt_tokens": 1}  # once it had the slot
    wait_for(lambda: state.admission.active == 0, "the slot to be released")


def test_a_long_text_is_refused_by_its_length_before_tokenizing(server, counted):
    """15 MiB of text took 18-25 s of CPU and 2.4 GiB to tokenize before it was refused."""
    url, state = server
    releases = state.counts["memory_releases"]
    length = 15 * 2**20
    body = json.dumps({**GOOD, "messages": [{"role": "user", "content": "y" * length}]}).encode()
    with peak_rss_reset() as growth:  # of this process: the server, and the client sending `body`
        started = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"},
                       timeout=30)
        took = time.monotonic() - started
        error = assert_refused(r, 400, f"{length} characters", f"limit of {2000 * MAX_CHARS_PER_TOKEN}",
                               "--max-prompt-tokens 2000")
        peak = growth()
    print(f"15 MiB text refused in {took:.2f} s, peak RSS +{peak / 2**20:.1f} MiB")
    assert error["param"] == "messages" and counted["prompt_tokens"] == 0 and took < 10
    # the body as received, as decoded text and the parsed string: three copies of 15 MiB, never the
    # tokens (a list of 15.7 million of them alone is 120 MiB)
    assert peak < 64 * 2**20, f"peak RSS grew by {peak / 2**20:.0f} MiB"
    wait_for(lambda: state.counts["memory_releases"] > releases, "the freed heap to be handed back")
    assert_still_serving(url)


def test_images_are_refused_by_their_headers_before_any_is_decoded(server, counted):
    """8 images of 4096x4096 in a 511 KiB body took +641 MiB to decode; now their headers
    are read first, and the request's pixels summed (--max-request-pixels)."""
    url, state = server
    content = [{"type": "text", "text": "eight"}] + [
        {"type": "image_url", "image_url": {"url": png_url(4096, 4096)}} for _ in range(8)]
    body = {**GOOD, "messages": [{"role": "user", "content": content}]}
    with peak_rss_reset() as growth:
        error = assert_refused(chat(url, body), 413, "--max-request-pixels", f"limit of {3 * 2**20} pixels")
        peak = growth()
    print(f"8 images of 4096x4096 refused by their headers, peak RSS +{peak / 2**20:.1f} MiB")
    assert error["param"] == "messages[0].content[1].image_url.url"  # the first one alone is over the budget
    assert counted["prompt_tokens"] == 0
    assert peak < 64 * 2**20, f"peak RSS grew by {peak / 2**20:.0f} MiB"  # one decoded image is 48 MiB (RGB)
    small = [{"type": "image_url", "image_url": {"url": png_url(1024, 1024)}} for _ in range(4)]
    error = assert_refused(chat(url, {**body, "messages": [{"role": "user", "content": small}]}), 413,
                           "reach 4194304 pixels with this one", "--max-request-pixels")
    assert error["param"] == "messages[0].content[3].image_url.url"  # the one that crosses the budget
    assert_still_serving(url)


# ---------------------------------------------------------- live sessions
def test_live_sessions_hold_a_slot_only_while_a_viewer_is_connected(server):
    """Two sessions created with no viewer blocked chat for 30 s; now they hold
    no slot, and their number is bounded on its own (--max-pending-live)."""
    url, state = server
    created = httpx.post(url + "/live/sessions", json={"video": "clip.mp4", "fps": 5, "realtime": False})
    assert created.status_code == 201
    assert (health(url)["sessions"], health(url)["live_waiting"]) == (0, 1)
    started = time.monotonic()
    assert_still_serving(url)  # the one slot is free for chat
    assert time.monotonic() - started < 5
    second = httpx.post(url + "/live/sessions", json={"video": "clip.mp4", "fps": 1})
    assert second.status_code == 201 and health(url)["live_waiting"] == 2
    third = httpx.post(url + "/live/sessions", json={"video": "clip.mp4", "fps": 1})
    assert_refused(third, 429, "2 live sessions wait for their viewer", "--max-pending-live 2")
    httpx.post(f"{url}/live/sessions/{second.json()['id']}/stop")
    events = read_events(url, created.json()["id"], until=lambda ev: ev[-1][0] == "caption")
    assert events[0][0] == "start"
    wait_for(lambda: health(url)["sessions"] == 0 and health(url)["live_waiting"] == 0, "the viewer's slot back")
    assert_still_serving(url)


# ----------------------------------------------------------------- uploads
def test_an_upload_takes_its_place_before_its_body_is_read_and_has_a_deadline(server):
    url, state = server
    video = (Path(state.media.root) / "clip.mp4").read_bytes()
    slow = raw_request(url, f"POST /live/uploads?fps=1&filename=a.mp4 HTTP/1.1\nContent-Length: {len(video)}\n",
                       video[:1000])  # then nothing: a client on a slow link, or one that never finishes
    wait_for(lambda: health(url)["uploads"] == 1, "the first upload to be received")
    started = time.monotonic()
    with raw_request(url, f"POST /live/uploads?fps=1 HTTP/1.1\nContent-Length: {len(video)}\n") as second:
        status, text = response_of(second)  # answered without a byte of its body
    assert status == 429 and "--max-uploads 1" in text  # before its body: one that waited for it would hang
    with slow:
        status, text = response_of(slow)
    assert status == 408 and "--body-timeout" in text and "1000 bytes arrived" in text
    assert time.monotonic() - started < LIMITS.body_timeout + 2
    assert list(state.upload_dir.iterdir()) == []
    assert (health(url)["uploads"], health(url)["live_waiting"]) == (0, 0)
    # a full set of waiting sessions refuses an upload before its body too
    waiting = [httpx.post(url + "/live/sessions", json={"video": "clip.mp4", "fps": 1}).json()["id"] for _ in "ab"]
    with raw_request(url, f"POST /live/uploads?fps=1 HTTP/1.1\nContent-Length: {len(video)}\n") as third:
        status, text = response_of(third)
    assert status == 429 and "--max-pending-live 2" in text and list(state.upload_dir.iterdir()) == []
    for sid in waiting:
        httpx.post(f"{url}/live/sessions/{sid}/stop")
    r = httpx.post(url + "/live/uploads", params={"fps": 5, "realtime": "false"}, content=video)
    assert r.status_code == 201, r.text
    assert read_events(url, r.json()["id"])[-1][0] == "end"
    assert_still_serving(url)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def captured_logs(*names):
    """Every record of the named loggers (INFO and up) while inside."""
    handler, loggers = Records(), [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def test_a_client_leaving_mid_upload_is_one_quiet_log_line(server):
    """It was two tracebacks (ours, and uvicorn's for the same exception)."""
    url, state = server
    with captured_logs("casa.serve", "uvicorn.error") as records:
        with raw_request(url, "POST /live/uploads?fps=1 HTTP/1.1\nContent-Length: 100000\n", b"x" * 1000):
            wait_for(lambda: health(url)["uploads"] == 1, "the upload to be received")
        wait_for(lambda: health(url)["uploads"] == 0 and health(url)["live_waiting"] == 0, "its places back")
        time.sleep(0.2)
    assert [(r.name, r.levelname, r.exc_info) for r in records] == [("casa.serve", "INFO", None)]
    assert "client left during POST /live/uploads" in records[0].getMessage()
    assert list(state.upload_dir.iterdir()) == []
    assert_still_serving(url)


def test_limits_derive_the_text_bound_from_the_token_bound():
    assert LIMITS.max_prompt_chars == 2000 * MAX_CHARS_PER_TOKEN
    with pytest.raises(ValueError, match="--max-request-pixels 0: must be > 0"):
        Limits(max_request_pixels=0)
    with pytest.raises(ValueError, match="--max-pending-live 1.5: must be a whole number"):
        Limits(max_pending_live=1.5)
    assert np.prod((4096, 4096)) * 2 == Limits().max_request_pixels
