"""`casa serve` refuses bad input with the right status and a message that names
the input, and keeps serving: after every refusal a good request succeeds.
One server for the module, with small limits so that each one is reachable."""

import base64
import io
import json
import socket
import subprocess
import threading

import httpx2 as httpx
import numpy as np
import openai
import pytest
import torch
from conftest import assert_user_error
from PIL import Image
from test_serve import (
    MODEL,
    data_url,
    health,
    image_array,
    make_checkpoint,
    read_events,
    slot_held,
    wait_for,
)
from test_stream import encode_video

from casa.cli import main as casa_main
from casa.serve.app import ServerThread, create_app
from casa.serve.engine import Engine
from casa.serve.limits import Limits

LIMITS = Limits(max_sessions=1, max_queue=1, queue_timeout=1.0, max_request_mb=1, max_upload_mb=0.05,
                max_video_seconds=3, max_tokens=64, max_prompt_tokens=2000, max_images=2, max_fps=5,
                connect_timeout=3.0)


def zero_frames(mp4: bytes) -> bytes:
    """The same MP4 container with every frame's data zeroed (its `mdat` box, before the index)."""
    start, end = mp4.index(b"mdat") + 4, mp4.index(b"moov") - 4
    assert start < end, "expected the frame data before the index"
    return mp4[:start] + bytes(end - start) + mp4[end:]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_bad")
    media, outside = root / "media", root / "outside"
    media.mkdir()
    outside.mkdir()
    clip = encode_video(media / "clip.mp4", 20)  # 2 s at 10 fps
    encode_video(outside / "secret.mp4", 20)
    Image.fromarray(image_array(0)).save(outside / "secret.png")
    (media / "link.mp4").symlink_to(outside / "secret.mp4")
    (media / "link.png").symlink_to(outside / "secret.png")
    fast = encode_video(root / "fast.mp4", 20, faststart=True).read_bytes()  # index first: a cut file still opens
    png = io.BytesIO()
    Image.fromarray(image_array(1)).save(png, format="PNG")
    uploads = {
        "text": b"just some text\n" * 50,
        "png": png.getvalue(),
        "corrupt": zero_frames(clip.read_bytes()),
        "truncated": fast[: len(fast) // 3],  # decodes a few frames, then ends early
        "long": encode_video(root / "long.mp4", 50).read_bytes(),  # 5 s > --max-video-seconds 3
        "large": np.random.default_rng(1).bytes(60 * 1024),  # > --max-upload-mb 0.05
    }
    return {"checkpoint": make_checkpoint(root / MODEL), "media": media, "outside": outside, "clip": clip,
            "uploads": uploads}


@pytest.fixture(scope="module")
def server(files):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    app = create_app(Engine(files["checkpoint"]), limits=LIMITS, media_dir=files["media"])
    with ServerThread(app) as url:
        yield url, app.state.casa
    torch.set_num_threads(threads)


# Greedy: the tiny model's non-letter logits are exactly 0, so sampling at the
# OpenAI default temperature of 1 can pick the end token first and stop early.
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "temperature": 0}


def chat(url, body, **kw):
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=30, **kw)


def assert_refused(response, status, *words):
    """The OpenAI error body, with a message naming the problem."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], f"{word!r} not in {error['message']!r}"
    return error


def assert_still_serving(url):
    r = chat(url, GOOD)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def message(content):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2}


def image_message(url):
    return message([{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": url}}])


# ------------------------------------------------------------ chat requests
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
NESTED = {"a": 0}
for _ in range(70):
    NESTED = {"a": NESTED}
URL = "messages[0].content[1].image_url.url"
# case: (body, status, the `param` naming the field, words of the message)
CHAT_CASES = {
    "list body": ([1, 2], 400, None, "must be a JSON object"),
    "unknown model": ({**GOOD, "model": "nope"}, 404, "model", "'nope' does not exist", "'tiny'"),
    "no messages": ({"model": MODEL}, 400, "messages", "messages: required"),
    "bad role": ({**GOOD, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role",
                 "messages[0].role='robot'"),
    "assistant last": ({**GOOD, "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages[0].role",
                       "last message"),
    "bad part": (message([{"type": "audio", "audio": "x"}]), 400, "messages[0].content[0]", "messages[0].content[0]",
                 "'audio'"),
    "etc passwd": (image_message("file:///etc/passwd"), 403, URL, "outside the media directory"),
    "remote url": (image_message("https://example.com/cat.png"), 400, URL, "does not fetch remote URLs"),
    "text data url": (image_message("data:text/plain;base64,aGVsbG8="), 400, URL, "'text/plain'", "not an image"),
    "eps data url": (image_message("data:image/x-eps;base64," + base64.b64encode(EPS).decode()), 400, URL,
                     "'image/x-eps'", "PNG, JPEG, WebP, GIF or BMP"),
    "bad base64": (image_message("data:image/png;base64,@@@"), 400, URL, "invalid base64"),
    "not an image": (image_message("data:image/png;base64,aGVsbG8="), 400, URL, "cannot decode the image",
                     "not a PNG, JPEG, WebP, GIF or BMP file"),
    "too many images": (message([{"type": "image_url", "image_url": {"url": data_url(image_array(k))}}
                                 for k in range(3)]), 400, "messages", "3 images, at most 2"),
    "long prompt": (message("y" * 2001), 400, "messages", "2001 tokens", "limit of 2000 (--max-prompt-tokens)"),
    "max_tokens 0": ({**GOOD, "max_tokens": 0}, 400, "max_tokens", "max_tokens=0", "[1, 64]"),
    "max_tokens huge": ({**GOOD, "max_tokens": 10**9}, 400, "max_tokens", "max_tokens=1000000000"),
    "max_tokens text": ({**GOOD, "max_tokens": "5"}, 400, "max_tokens", "max_tokens='5'"),
    "temperature": ({**GOOD, "temperature": 3}, 400, "temperature", "temperature=3"),
    "top_p 0": ({**GOOD, "top_p": 0}, 400, "top_p", "top_p=0"),
    "seed 2**70": ({**GOOD, "seed": 2**70}, 400, "seed", f"seed={2**70}", "[-2**63, 2**63 - 1]"),
    "five stops": ({**GOOD, "stop": list("abcde")}, 400, "stop", "stop="),
    "n 2": ({**GOOD, "n": 2}, 400, "n", "n=2"),
    "stream text": ({**GOOD, "stream": "yes"}, 400, "stream", "stream='yes'"),
    "deep nesting": ({**GOOD, "metadata": NESTED}, 400, "metadata", "nested more than 64 levels"),
}


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_bad_chat_request(server, case):
    body, status, param, *words = CHAT_CASES[case]
    error = assert_refused(chat(server[0], body), status, *words)
    assert error["type"] == {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error"}[status]
    assert error["param"] == param
    assert_still_serving(server[0])


def raw_post(url, path, body: bytes):
    return httpx.post(url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)


def test_bodies_that_were_500s_are_400s_naming_the_field(server):
    """Deep nesting (a RecursionError), a lone surrogate (UnicodeEncodeError far from
    the input), NaN, a file name too long: each was an internal error."""
    url = server[0]
    assert_refused(raw_post(url, "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000), 400,
                   "request body: JSON nested too deeply")
    for text in (b'"a\\ud800b"', b'"a\xed\xa0\x80b"'):  # escaped, and as (invalid) UTF-8 bytes
        body = b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": %s}]}' % text
        error = assert_refused(raw_post(url, "/v1/chat/completions", body), 400, "lone UTF-16 surrogate")
        assert error["param"] == "messages[0].content"
    error = assert_refused(raw_post(url, "/live/sessions", b'{"video": "\\udfff.mp4"}'), 400, "surrogate")
    assert error["param"] == "video"
    assert_refused(raw_post(url, "/v1/chat/completions", b'{"model": "tiny", "temperature": NaN}'), 400,
                   "not valid JSON", "NaN")
    error = assert_refused(httpx.post(url + "/live/sessions", json={"video": "a" * 5000}), 400,
                           "not a usable file name")
    assert error["param"] == "video"
    surrogate_pair = b'{"model": "tiny", "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", ' \
                     b'"content": "\\ud83d\\ude00"}]}'  # an escaped pair is text (an emoji)
    assert raw_post(url, "/v1/chat/completions", surrogate_pair).status_code == 200
    assert_still_serving(url)


def test_images_are_decoded_from_five_formats_only(server, monkeypatch):
    """An EPS sent as data:image/png reached Pillow's Ghostscript plugin."""
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self))
    url = "data:image/png;base64," + base64.b64encode(EPS).decode()
    error = assert_refused(chat(server[0], image_message(url)), 400, "not a PNG, JPEG, WebP, GIF or BMP file")
    assert error["param"] == URL and opened == [] and "Ghostscript" not in error["message"]
    assert_still_serving(server[0])


def test_base64_data_urls_in_any_case_and_wrapped_over_lines(server):
    """RFC 2397 and MIME: `;BASE64` is the same parameter; base64 is wrapped at 76 columns."""
    png = io.BytesIO()
    Image.fromarray(image_array(4)).save(png, format="PNG")
    text = base64.b64encode(png.getvalue()).decode()
    wrapped = "\r\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    replies = []
    for url in ("data:image/png;base64," + text, "data:image/png;BASE64," + text,
                "data:image/png;Base64," + wrapped, "data:image/PNG;base64," + text.replace("=", "%3D")):
        r = chat(server[0], {**image_message(url), "temperature": 0})
        assert r.status_code == 200, r.text
        replies.append((r.json()["choices"][0]["message"]["content"], r.json()["usage"]))
    assert replies[1:] == replies[:1] * 3


def test_malformed_json_oversized_body_and_unknown_routes(server):
    url = server[0]
    r = httpx.post(url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [', timeout=30,
                   headers={"Content-Type": "application/json"})
    assert_refused(r, 400, "not valid JSON")
    big = message("x" * (1024 * 1024 + 10))
    assert_refused(chat(url, big), 413, "limit of 1048576 bytes")
    assert_refused(httpx.get(url + "/v1/nothing"), 404, "'/v1/nothing'")
    assert_refused(httpx.get(url + "/v1/chat/completions"), 405, "GET")
    assert_still_serving(url)


def test_files_outside_the_media_directory_are_unreadable(server, files):
    url, media, outside = server[0], files["media"], files["outside"]
    for name in (f"{media}/../outside/secret.png", str(outside / "secret.png"), str(media / "link.png")):
        assert_refused(chat(url, image_message("file://" + name)), 403, "outside the media directory")
        assert_still_serving(url)
    for video in ("../outside/secret.mp4", str(outside / "secret.mp4"), "link.mp4", "sub/../../outside/secret.mp4"):
        r = httpx.post(url + "/live/sessions", json={"video": video, "fps": 1})
        assert_refused(r, 403, repr(video), "outside the media directory")
        assert_still_serving(url)
    assert_refused(httpx.post(url + "/live/sessions", json={"video": "missing.mp4"}), 404, "'missing.mp4'")
    assert httpx.get(url + "/live/config").json()["videos"] == ["clip.mp4"]  # the symlink out is not listed


def test_the_openai_client_sees_the_message(server):
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match=r"max_tokens=100: must be an integer in \[1, 64\]"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=100)
    with pytest.raises(openai.NotFoundError, match="'gpt-4o' does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert client.chat.completions.create(**GOOD).usage.completion_tokens == 2


# ------------------------------------------------------------------ uploads
UPLOAD_CASES = {
    "text": (415, "not a video file", "notes.mp4"),
    "png": (415, "an image (png_pipe), not a video"),
    "corrupt": (400, "notes.mp4", "no video frame could be decoded"),
    "long": (413, "5.0 s long", "--max-video-seconds"),
    "large": (413, "--max-upload-mb"),
}


@pytest.mark.parametrize("case", list(UPLOAD_CASES))
def test_bad_upload(server, files, case):
    url, state = server
    status, *words = UPLOAD_CASES[case]
    r = httpx.post(url + "/live/uploads", params={"fps": 1, "filename": "notes.mp4"}, content=files["uploads"][case])
    assert_refused(r, status, *words)
    assert list(state.upload_dir.iterdir()) == []  # nothing kept of a refused upload
    assert str(state.upload_dir) not in r.text  # named as the viewer named it
    assert_still_serving(url)


def test_bad_live_options(server):
    url = server[0]
    assert_refused(httpx.post(url + "/live/uploads", params={"fps": 1}, content=b""), 400, "empty body")
    assert_refused(httpx.post(url + "/live/sessions", json={"video": "clip.mp4", "fps": 0}), 400, "fps=0")
    assert_refused(httpx.post(url + "/live/sessions", json={"video": "clip.mp4", "fps": 50}), 400, "--max-fps")
    assert_refused(httpx.post(url + "/live/sessions", json={"video": "clip.mp4", "fps": "a"}), 400, "fps='a'")
    assert_refused(httpx.post(url + "/live/sessions", json={"fps": 1}), 400, "video: required")
    assert_refused(httpx.post(url + "/live/sessions", json={"video": "clip.mp4", "history": "none"}), 400,
                   "history='none'", "bounded, full")
    too_long = {"video": "clip.mp4", "instruction": "x" * 1001}
    assert_refused(httpx.post(url + "/live/sessions", json=too_long), 400, "instruction", "at most 1000")
    assert_refused(httpx.get(url + "/live/sessions/nope/events"), 404, "'nope'")
    assert_still_serving(url)


def test_a_truncated_video_is_captioned_as_far_as_it_decodes_and_says_so(server, files):
    url, state = server
    r = httpx.post(url + "/live/uploads", params={"fps": 5, "realtime": "false", "filename": "cut.mp4"},
                   content=files["uploads"]["truncated"])
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    events = read_events(url, sid)
    warnings = [d["message"] for k, d in events if k == "warning"]
    assert len(warnings) == 1 and warnings[0].startswith("cut.mp4: ") and str(state.upload_dir) not in warnings[0]
    kind, end = events[-1]
    assert kind == "end" and end["reason"] == "finished" and end["undecodable"] > 0
    assert end["frames"] == sum(k == "caption" for k, _ in events) >= 1  # the frames before the cut
    assert_refused(httpx.get(f"{url}/live/sessions/{sid}/events"), 409, "already finished")
    wait_for(lambda: state.admission.active == 0, "the slot to be freed")
    assert list(state.upload_dir.iterdir()) == []
    assert_still_serving(url)


# -------------------------------------------------------------- concurrency
def test_over_the_limits_429_then_503_and_back_to_serving(server):
    """One slot, one queue place: a running session holds the slot; a chat waits
    in the queue; the next is refused at once (429), and so is a live viewer;
    the queued one gives up after --queue-timeout (503); once the slot is
    free, chats run again."""
    url, state = server
    waiting = httpx.post(url + "/live/sessions", json={"video": "clip.mp4", "fps": 1})  # waits for a viewer
    assert waiting.status_code == 201
    queued: list = []
    with slot_held(state):
        waiter = threading.Thread(target=lambda: queued.append(chat(url, GOOD)))
        waiter.start()
        wait_for(lambda: state.admission.queued == 1, "a request to be queued")
        refused = chat(url, GOOD)
        error = assert_refused(refused, 429, "server busy", "--max-sessions 1", "--max-queue 1")
        assert error["code"] == "rate_limit_exceeded" and refused.headers["retry-after"] == "1"
        viewer = httpx.get(f"{url}/live/sessions/{waiting.json()['id']}/events")
        assert_refused(viewer, 429, "server busy")
        assert httpx.get(f"{url}/live/sessions/{waiting.json()['id']}").json()["state"] == "waiting"  # may retry
        waiter.join()
        assert_refused(queued[0], 503, "within 1 s", "--queue-timeout")
        # a queued request gets the slot as soon as it is freed
        queued.clear()
        waiter = threading.Thread(target=lambda: queued.append(chat(url, GOOD)))
        waiter.start()
        wait_for(lambda: state.admission.queued == 1, "a request to be queued")
    waiter.join()
    assert queued[0].status_code == 200
    assert httpx.post(f"{url}/live/sessions/{waiting.json()['id']}/stop").json()["state"] == "stopped"
    assert_still_serving(url)


def test_a_session_nobody_watches_expires(server):
    """A created session waits for its viewer holding no slot: chat runs meanwhile."""
    url, state = server
    sid = httpx.post(url + "/live/sessions", json={"video": "clip.mp4", "fps": 1}).json()["id"]
    assert (state.admission.active, health(url)["live_waiting"]) == (0, 1)
    assert_still_serving(url)
    wait_for(lambda: httpx.get(f"{url}/live/sessions/{sid}").json()["state"] == "expired", "the session to expire",
             timeout=LIMITS.connect_timeout + 5)
    assert (state.admission.active, health(url)["live_waiting"]) == (0, 0)
    assert_refused(httpx.get(f"{url}/live/sessions/{sid}/events"), 409, "already expired")
    assert_still_serving(url)


# ---------------------------------------------------------------------- CLI
def run_serve(capsys, *args):
    """`casa serve ARGS` in this process, as a CompletedProcess for assert_user_error."""
    try:
        code = casa_main(["serve", *map(str, args)])
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_bad_command_lines(files, capsys, tmp_path):
    missing = tmp_path / "no-model"
    result = run_serve(capsys, "--checkpoint", missing, "--port", 0)
    assert_user_error(result, str(missing))
    assert result.returncode == 2 and result.stderr.startswith("casa: error: ")
    result = run_serve(capsys, "--checkpoint", files["checkpoint"], "--port", 0, "--media-dir", files["clip"])
    assert_user_error(result, "--media-dir", str(files["clip"]), "not a directory")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_serve(capsys, "--checkpoint", files["checkpoint"], "--port", port)
        assert_user_error(result, f"--port {port}", "cannot listen")
    result = run_serve(capsys, "--checkpoint", files["checkpoint"], "--max-sessions", 0)
    assert_user_error(result, "--max-sessions", "'0'")
    assert result.returncode == 2


def test_limits_name_their_flag():
    with pytest.raises(ValueError, match="--max-upload-mb 0: must be > 0"):
        Limits(max_upload_mb=0)
    with pytest.raises(ValueError, match="--max-sessions True: must be > 0"):
        Limits(max_sessions=True)
    assert (LIMITS.max_request_bytes, LIMITS.max_upload_bytes) == (2**20, int(0.05 * 2**20))


def test_a_queued_client_that_leaves_gives_its_place_back(server):
    url, state = server
    payload = json.dumps(GOOD).encode()
    host, port = url[len("http://"):].split(":")
    with slot_held(state):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (host.encode(), port.encode(), len(payload)) + payload)
            wait_for(lambda: state.admission.queued == 1, "the request to be queued")
        wait_for(lambda: state.admission.queued == 0, "the queue place to be given back", timeout=0.9)  # < timeout
        assert state.admission.active == 1  # the held slot only: the leaver never got one
    wait_for(lambda: state.admission.active == 0, "the slot to be released")
    assert_still_serving(url)
