"""Camera (and screen) sessions of `casa serve` over plain HTTP: the viewer posts each frame as
a JPEG to `POST /live/sessions/{id}/frames`; the server captions the newest frame whenever
the model is free (the library's live scheduler), drops the others and counts them. The
page's own camera is driven in `test_serve_browser.py`."""

import io
import threading
import time

import httpx2 as httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_bad_input_serve import assert_refused
from test_serve import MODEL, health, make_checkpoint, read_events, wait_for
from test_stream import encode_video

from casa.serve.app import ServerThread, create_app
from casa.serve.engine import Engine
from casa.serve.limits import Limits

FRAME_BYTES = 64 * 1024  # --max-request-mb of the test server: what one frame may weigh


def jpeg(seed: int = 0, size=(64, 48), noise: bool = False) -> bytes:
    """A JPEG of `size` (width, height): a flat colour, or noise (which compresses badly)."""
    rng = np.random.default_rng(seed)
    if noise:
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    else:
        pixels = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (size[1], size[0], 3)).copy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve_camera")
    (root / "media").mkdir()
    encode_video(root / "media" / "clip.mp4", 10)
    engine = Engine(make_checkpoint(root / MODEL))
    limits = Limits(max_sessions=1, max_request_mb=FRAME_BYTES / 2**20, max_image_pixels=320 * 240)
    app = create_app(engine, limits=limits, media_dir=root / "media")
    with ServerThread(app) as url:
        yield url, app.state.casa
    torch.set_num_threads(threads)


class Viewer:
    """A session's event stream read on a thread (as the page reads it), its events in `events`;
    the viewer is connected (the session running) once its `start` event has come."""

    def __init__(self, url: str, sid: str):
        self.events: list[tuple[str, dict]] = []
        self.opened = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(url, sid), daemon=True)
        self.thread.start()
        assert self.opened.wait(10), "the event stream did not open"

    def _read(self, url, sid):
        # the first event (start) sets `opened`; set() is None, so reading goes on to the end
        read_events(url, sid, until=lambda events: self.opened.set(), events=self.events)

    def of(self, kind: str) -> list[dict]:
        return [d for k, d in self.events if k == kind]


def post_frame(url, sid, body, kind="image/jpeg", client=httpx):
    return client.post(f"{url}/live/sessions/{sid}/frames", content=body,
                       headers={} if kind is None else {"Content-Type": kind})


def camera_session(url, **options) -> str:
    r = httpx.post(url + "/live/sessions", json={"source": "camera", "fps": 10, "max_tokens": 8, **options})
    assert r.status_code == 201, r.text
    assert r.json()["source"] == "camera" and r.json()["video"] == "camera"
    return r.json()["id"]


def test_the_frames_route_refuses_what_it_cannot_use(server):
    """404 for an unknown session, 409 outside a connected camera session, 403 from another site's page,
    415 for another type, 413 past --max-request-mb or --max-image-pixels, 400 for a body that is no
    JPEG; a JPEG whose data cannot be decoded is skipped with a warning when its turn comes."""
    url, state = server
    assert_refused(post_frame(url, "nope", jpeg()), 404, "'nope'")
    sid = camera_session(url)
    assert_refused(post_frame(url, sid, jpeg()), 409, "before its viewer has connected")
    assert_refused(httpx.post(url + "/live/sessions", json={"source": "webcam"}), 400, "source='webcam'")
    assert_refused(httpx.post(url + "/live/sessions", json={"source": "camera", "video": "a.mp4"}), 400, "video")
    viewer = Viewer(url, sid)
    r = httpx.post(f"{url}/live/sessions/{sid}/frames", content=jpeg(),
                   headers={"Content-Type": "image/jpeg", "Origin": "http://evil.example"})
    assert_refused(r, 403, "another site's page")  # the guard's rules hold here as everywhere
    for kind in ("image/png", "text/plain", "application/octet-stream", "multipart/form-data", None):
        assert_refused(post_frame(url, sid, jpeg(), kind), 415, "image/jpeg")
    big = jpeg(size=(300, 200), noise=True)
    assert len(big) > FRAME_BYTES
    assert_refused(post_frame(url, sid, big), 413, f"limit of {FRAME_BYTES} bytes", "--max-request-mb")
    assert_refused(post_frame(url, sid, jpeg(size=(400, 300))), 413, "400x300", "--max-image-pixels")
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    assert_refused(post_frame(url, sid, png.getvalue()), 400, "not a JPEG")
    assert_refused(post_frame(url, sid, b""), 400, "empty body")
    noisy = jpeg(seed=3, size=(64, 48), noise=True)
    truncated = noisy[: len(noisy) // 2]  # its header, then half of its data
    assert post_frame(url, sid, truncated).status_code == 202  # decoded only when captioned: a warning then
    wait_for(lambda: viewer.of("warning"), "the undecodable frame's warning")
    assert "frame 0" in viewer.of("warning")[0]["message"] and not viewer.of("caption")
    first = post_frame(url, sid, jpeg(1))
    assert first.status_code == 202 and first.json()["index"] == 1
    wait_for(lambda: viewer.of("caption"), "a caption")
    assert viewer.of("caption")[0]["index"] == 1
    assert httpx.post(f"{url}/live/sessions/{sid}/stop").json()["state"] == "stopped"
    assert_refused(post_frame(url, sid, jpeg()), 409, "stopped")
    viewer.thread.join(10)
    end = viewer.of("end")[0]
    assert end["reason"] == "stopped" and end["frames"] == 1 and end["undecodable"] == 1 and end["received"] == 2
    video = httpx.post(url + "/live/sessions", json={"video": "clip.mp4"}).json()["id"]
    assert_refused(post_frame(url, video, jpeg()), 409, "camera or screen session only")
    httpx.post(f"{url}/live/sessions/{video}/stop")


def test_frames_posted_faster_than_the_model_captions_are_dropped_not_queued(server, monkeypatch):
    """40 frames posted every 10 ms to a captioner that takes 250 ms a frame: each post is answered at
    once, the model captions the newest frame whenever it is free (the last one posted among them), the
    others are dropped and counted, and the lag stays within about two captions' time (a queue would
    reach about 10 s)."""
    url, state = server
    make = state.engine.captioner

    def slow_captioner(**kwargs):
        captioner = make(**kwargs)
        caption = captioner.caption

        def slowly(frame):
            time.sleep(0.25)
            return caption(frame)

        captioner.caption = slowly
        return captioner

    monkeypatch.setattr(state.engine, "captioner", slow_captioner)
    sid = camera_session(url, history="full")
    viewer = Viewer(url, sid)
    assert viewer.events[0] == ("start", {"id": sid, "video": "camera", "source": "camera", "fps": 10.0,
                                          "history": "full"})
    assert health(url)["sessions"] == 1  # the viewer holds the slot
    posted, answer_ms = [], []
    with httpx.Client() as client:  # one keep-alive connection, as the page's
        for i in range(40):
            t0 = time.perf_counter()
            r = post_frame(url, sid, jpeg(i), client=client)
            answer_ms.append((time.perf_counter() - t0) * 1e3)
            assert r.status_code == 202, r.text
            posted.append(r.json()["index"])
            time.sleep(0.01)
    assert posted == list(range(40))
    assert sorted(answer_ms)[20] < 20 and max(answer_ms) < 200  # never waits for the model
    wait_for(lambda: viewer.of("caption") and viewer.of("caption")[-1]["index"] == 39, "the last frame's caption")
    captions = viewer.of("caption")
    indices = [c["index"] for c in captions]
    assert set(indices) <= set(posted) and indices == sorted(set(indices))  # newer frames only, none twice
    assert 2 <= len(captions) <= 10, indices  # 40 frames in ~0.5 s at 0.25 s a caption
    assert sum(c["dropped"] for c in captions) == captions[-1]["dropped_total"] == 40 - len(captions)
    assert [c["dropped"] for c in captions] == [b - a - 1 for a, b in zip([-1] + indices, indices)]
    assert all(0.25 <= c["lag_ms"] / 1e3 < 1.5 for c in captions), [c["lag_ms"] for c in captions]
    assert all(c["text"] is not None and c["ttft_ms"] > 0 and c["cache_bytes"] > 0 for c in captions)
    summary = httpx.get(f"{url}/live/sessions/{sid}").json()
    assert summary["counts"]["received"] == 40 and summary["counts"]["dropped"] == 40 - len(captions)
    viewer_stream_closed = httpx.post(f"{url}/live/sessions/{sid}/stop").json()
    assert viewer_stream_closed["state"] == "stopped"
    viewer.thread.join(10)
    end = viewer.of("end")[0]
    assert end["received"] == 40 and end["dropped"] == 40 - len(captions) and end["frames"] == len(captions)
    assert end["drop_rate"] == pytest.approx((40 - len(captions)) / 40, abs=1e-4)
    assert set(end["lag_ms"]) == {"p50", "p90", "p95", "p99", "max"}
    wait_for(lambda: health(url)["sessions"] == 0, "the slot to be freed")
    srt = httpx.get(f"{url}/live/sessions/{sid}/captions.srt")
    assert srt.headers["content-disposition"] == 'attachment; filename="camera.srt"'


def test_a_camera_session_frees_its_slot_when_its_viewer_leaves(server):
    url, state = server
    sid = camera_session(url)
    with httpx.stream("GET", f"{url}/live/sessions/{sid}/events", timeout=30) as r:
        assert r.status_code == 200
        assert post_frame(url, sid, jpeg()).status_code == 202
        assert health(url)["sessions"] == 1
        second = camera_session(url)
        assert_refused(httpx.get(f"{url}/live/sessions/{second}/events"), 429, "--max-sessions")
    wait_for(lambda: httpx.get(f"{url}/live/sessions/{sid}").json()["state"] == "stopped", "the session to stop")
    wait_for(lambda: health(url)["sessions"] == 0, "the slot to be freed")
    assert_refused(post_frame(url, sid, jpeg()), 409, "stopped")
    httpx.post(f"{url}/live/sessions/{second}/stop")
