"""The live-captioning page in a real browser: headless Chromium from the
system's package (Debian's `chromium`), driven by playwright with
`executable_path` (no browser is downloaded). It opens the page, captions a
video from the media directory and an uploaded one, then Chromium's fake
camera and screen (`--use-fake-device-for-media-stream`,
`--use-fake-ui-for-media-stream`: a generated test pattern, no permission
prompt), and saves screenshots (to `$CASA_SERVE_SCREENSHOT` and
`$CASA_SERVE_CAMERA_SCREENSHOT` if set). Skipped, with the reason, where no
Chromium or no playwright is installed."""

import os
import shutil

import httpx2 as httpx
import pytest
import torch
from test_serve import MODEL, make_checkpoint, wait_for
from test_stream import encode_video

from casa.inference.writers import parse_srt
from casa.serve.app import ServerThread, create_app
from casa.serve.engine import Engine
from casa.serve.guard import Access
from casa.serve.limits import Limits

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_browser")
    media = root / "media"
    media.mkdir()
    encode_video(media / "shapes.mp4", 30, size=(96, 128))  # 3 s at 10 fps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    app = create_app(Engine(make_checkpoint(root / MODEL)), limits=Limits(max_sessions=2), media_dir=media)
    with ServerThread(app) as url:
        yield url, app.state.casa, media
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def keyed_server(server):
    """A second server on the same model and media, with an API key."""
    state, media = server[1], server[2]
    app = create_app(state.engine, limits=Limits(max_sessions=1), media_dir=media, access=Access("page-key-42"))
    with ServerThread(app) as url:
        yield url, app.state.casa


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            "--auto-select-desktop-capture-source=Entire screen"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser):
    """The page, with every message the browser logs kept in `page.console` (a Content-Security-Policy
    violation would be one)."""
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.console = []
    page.on("console", lambda m: page.console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: page.console.append(f"pageerror: {e}"))
    yield page
    page.close()


def assert_no_policy_violation(page):
    assert not [m for m in page.console if "Content Security Policy" in m or m.startswith("pageerror")], page.console


CHARTS = ("chart-ttft", "chart-lag", "chart-dropped", "chart-rss", "chart-state")


def painted_pixels(page, canvas_id: str) -> int:
    """Pixels of a chart canvas that are neither blank nor grey (the plotted line and points)."""
    return page.evaluate("""(id) => {
        const c = document.getElementById(id);
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) {
            const [r, g, b, a] = [d[i], d[i + 1], d[i + 2], d[i + 3]];
            if (a > 0 && Math.max(r, g, b) - Math.min(r, g, b) > 60) n++;
        }
        return n;
    }""", canvas_id)


def test_captioning_a_video_in_the_browser(server, page, tmp_path):
    url, state, media = server
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(url + "/")
    page.wait_for_function("() => document.getElementById('status').textContent === 'ready'")
    assert page.text_content("#model") == f"model {MODEL}"
    page.select_option("#video", "shapes.mp4")
    page.fill("#fps", "2")
    page.click("#start")
    page.wait_for_function("() => document.querySelectorAll('#captions li').length === 6", timeout=30_000)
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('finished')")
    assert page.text_content("#status") == "finished: 6 frames captioned"
    assert page.get_attribute("#frame", "src").startswith("data:image/jpeg;base64,")
    times = page.eval_on_selector_all("#captions time", "els => els.map(e => e.textContent)")
    assert times == ["00:00.00", "00:00.50", "00:01.00", "00:01.50", "00:02.00", "00:02.50"]
    series = page.evaluate("window.casaLive.series")
    assert [len(v) for v in series.values()] == [6] * 5 and all(v > 0 for v in series["ttft"] + series["lag"])
    assert series["dropped"] == [0] * 6  # a video's frames are never dropped
    for chart in CHARTS:
        assert painted_pixels(page, chart) > 50, f"{chart} has no plotted line"
    srt = httpx.get(url + page.get_attribute("#srt", "href")).text
    shown = page.eval_on_selector_all("#captions li span", "els => els.map(e => e.textContent)")
    assert [cue[3] for cue in parse_srt(srt)] == [t for t in shown if t != "…"]
    assert all(u.startswith(url) or u.startswith("data:") for u in requested), requested  # nothing from outside
    shot = os.environ.get("CASA_SERVE_SCREENSHOT") or str(tmp_path / "serve.png")
    page.screenshot(path=shot, full_page=True)
    assert os.path.getsize(shot) > 10_000
    assert_no_policy_violation(page)


def test_uploading_then_stopping_in_the_browser(server, page):
    url, state, media = server
    page.goto(url + "/")
    page.wait_for_function("() => document.getElementById('status').textContent === 'ready'")
    page.set_input_files("#file", str(media / "shapes.mp4"))
    page.fill("#fps", "1")
    page.click("#start")
    page.wait_for_function("() => document.querySelectorAll('#captions li').length >= 1", timeout=30_000)
    page.click("#stop")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('stopped')")
    assert page.is_enabled("#start") and not page.is_enabled("#stop")
    wait_for(lambda: httpx.get(url + "/health").json()["live_sessions"] == 0, "the session to be freed")
    assert list(state.upload_dir.iterdir()) == []
    assert_no_policy_violation(page)


@pytest.mark.parametrize("source", ["camera", "screen"])
def test_captioning_the_camera_in_the_browser(server, browser, source, tmp_path):
    """The page sends the fake camera's (or screen's) frames as JPEGs at the chosen rate; the server
    captions frames the browser sent, newest first, holding a slot while the page is connected; the page
    shows the captions and charts their lag and drops."""
    url, state, media = server
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.console = []
    page.on("console", lambda m: page.console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: page.console.append(f"pageerror: {e}"))
    page.goto(url + "/")
    page.wait_for_function("() => document.getElementById('status').textContent === 'ready'")
    page.select_option("#source", source)
    assert not page.is_visible("#video") and not page.is_visible("#realtime")  # a video's options only
    page.fill("#fps", "5")
    page.click("#start")
    page.wait_for_function("() => document.querySelectorAll('#captions li').length >= 3", timeout=15_000)
    assert page.is_visible("#camera") and page.text_content("#status").startswith(f"captioning {source} at 5 fps")
    session = state.live.get(page.evaluate("window.casaLive.session"))
    assert session.source == source and session.state == "running"
    assert httpx.get(url + "/health").json()["sessions"] == 1  # the page holds a slot while connected
    page.click("#stop")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('stopped')")
    wait_for(lambda: httpx.get(url + "/health").json()["sessions"] == 0, "the slot to be freed")
    received = session.slot.received
    page.wait_for_function(f"() => window.casaLive.sent.length === {received}")  # a post in flight at the stop
    sent = page.evaluate("window.casaLive.sent")
    captioned = [c.frame for c in session.captions]
    assert received > 0 and len(captioned) >= 3
    assert sent == list(range(received)) and set(captioned) <= set(sent), (sent, captioned)
    assert captioned == sorted(set(captioned))  # newer frames only, each once
    shown = page.eval_on_selector_all("#captions li span", "els => els.map(e => e.textContent)")
    assert shown == [c.text or "…" for c in session.captions] and any(c.text for c in session.captions)
    series = page.evaluate("window.casaLive.series")
    assert len(series["lag"]) == len(series["dropped"]) == len(captioned) and all(v > 0 for v in series["lag"])
    dropped = len(sent) - len(captioned)
    assert sum(series["dropped"]) <= dropped <= sum(series["dropped"]) + 1  # the newest may wait in the slot
    for chart in CHARTS:
        assert painted_pixels(page, chart) > 50, f"{chart} has no plotted line"
    assert page.text_content("#status").startswith(f"stopped: {len(captioned)} frames captioned of {received} "
                                                   f"received, {session.lag.dropped} dropped, lag p95 ")
    assert page.evaluate("document.getElementById('camera').srcObject === null")  # the camera is released
    assert page.get_attribute("#frame", "src").startswith("data:image/jpeg;base64,")  # its last frame stays
    if source == "camera":
        shot = os.environ.get("CASA_SERVE_CAMERA_SCREENSHOT") or str(tmp_path / "camera.png")
        page.screenshot(path=shot, full_page=True)
        assert os.path.getsize(shot) > 10_000
    assert_no_policy_violation(page)
    page.close()


def test_the_page_asks_for_the_api_key_and_sends_it(keyed_server, browser, tmp_path):
    """With --api-key the page asks for the key, then sends it on every request: the
    event stream (read with fetch) and the SRT download included."""
    url, state = keyed_server
    page = browser.new_page(accept_downloads=True)
    sent = []
    page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))))
    page.goto(url + "/")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('needs an API key')")
    assert page.is_visible("#key")
    page.fill("#key", "wrong")
    page.click("#use-key")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('invalid API key')")
    page.fill("#key", "page-key-42")
    page.click("#use-key")
    page.wait_for_function("() => document.getElementById('status').textContent === 'ready'")
    assert not page.is_visible("#key")
    page.select_option("#video", "shapes.mp4")
    page.fill("#fps", "1")
    page.uncheck("#realtime")
    page.click("#start")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('finished')",
                           timeout=30_000)
    assert page.text_content("#status") == "finished: 3 frames captioned"
    with page.expect_download() as download:
        page.click("#srt")
    saved = tmp_path / "captions.srt"
    download.value.save_as(saved)
    assert download.value.suggested_filename == "shapes.srt" and len(parse_srt(saved.read_text())) == 3
    api = [(u, auth) for u, auth in sent if "/live/" in u]
    assert {u.rsplit("/", 1)[1] for u, _ in api} >= {"config", "sessions", "events", "captions.srt"}
    assert all(auth == "Bearer page-key-42" for u, auth in api[2:]), api  # after the two tries of the key
    assert not [u for u, _ in sent if "key" in u.split("?")[-1]]  # never in a URL
    page.close()
