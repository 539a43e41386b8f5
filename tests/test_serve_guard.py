"""`casa serve` is safe to leave running: an API key on every route but health
and the page's files, JSON only as JSON, the Host and Origin checked, strict
security headers, bounded connections (slow and idle sockets closed, a
connection limit) and internal errors that show nothing but an id. One real
server for the module, with a key, one extra host name and short timeouts."""

import re
import socket
import time

import httpx2 as httpx
import openai
import pytest
import torch
from conftest import assert_user_error
from test_bad_input_serve import run_serve
from test_serve import MODEL, health, make_checkpoint, wait_for
from test_serve_admission import captured_logs, raw_request, response_of

from casa.cli.serve import API_KEY_ENV
from casa.serve.app import ServerThread, create_app
from casa.serve.engine import Engine
from casa.serve.guard import Access
from casa.serve.limits import Limits

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = Limits(max_sessions=1, max_tokens=8, max_connections=4, header_timeout=1.0, keep_alive_timeout=1.0,
                body_timeout=1.0)
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_guard")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    app = create_app(Engine(make_checkpoint(root / MODEL)), limits=LIMITS,
                     access=Access.from_options(KEY, "casa.example, other.example:9"))
    with ServerThread(app) as url:
        yield url, app.state.casa
    torch.set_num_threads(threads)


def post_chat(url, body=GOOD, **kw):
    kw.setdefault("headers", AUTH)
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=30, **kw)


def refused(response, status, param, *words) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    for word in words:
        assert word in error["message"], f"{word!r} not in {error['message']!r}"
    return error


# --------------------------------------------------------------- API key
def test_every_route_but_health_and_the_page_needs_the_key(server):
    url, _ = server
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/live/config"),
                         ("POST", "/live/sessions"), ("POST", "/live/uploads"), ("GET", "/live/sessions/x/events"),
                         ("POST", "/live/sessions/x/frames"),
                         ("GET", "/nothing")):
        r = httpx.request(method, url + path)
        error = refused(r, 401, "Authorization", "missing API key", "Authorization: Bearer")
        assert error["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    refused(post_chat(url, headers={"Authorization": "Bearer wrong"}), 401, "Authorization", "invalid API key")
    refused(post_chat(url, headers={"Authorization": KEY}), 401, "Authorization")  # not a Bearer token
    for path in ("/health", "/", "/static/live.js", "/static/live.css"):
        assert httpx.get(url + path).status_code == 200, path
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.chat.completions.create(**GOOD).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_a_bad_key_is_refused_at_start_up_naming_where_it_came_from(capsys, tmp_path, monkeypatch):
    missing = tmp_path / "no-model"  # never reached: the key is checked first
    assert_user_error(run_serve(capsys, "--checkpoint", missing, "--api-key", "two words"), "--api-key")
    monkeypatch.setenv(API_KEY_ENV, "")
    assert_user_error(run_serve(capsys, "--checkpoint", missing), f"${API_KEY_ENV}", "non-empty")
    monkeypatch.delenv(API_KEY_ENV)
    assert_user_error(run_serve(capsys, "--checkpoint", missing, "--allowed-hosts", "a b"), "--allowed-hosts")


# ---------------------------------------------------------- CSRF, rebinding
def test_json_endpoints_refuse_other_content_types(server):
    """A page on another origin can POST text/plain without a preflight: that was the CSRF."""
    url, _ = server
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {**AUTH, **({"Content-Type": kind} if kind else {})}
        r = httpx.post(url + "/v1/chat/completions", content=body, headers=headers)
        refused(r, 415, "Content-Type", "application/json")
    r = httpx.post(url + "/live/sessions", content=b'{"video": "a.mp4"}',
                   headers={**AUTH, "Content-Type": "text/plain"})
    refused(r, 415, "Content-Type")
    r = httpx.post(url + "/live/uploads", content=b"x" * 100, headers={**AUTH, "Content-Type": "multipart/form-data"})
    refused(r, 415, "Content-Type", "application/octet-stream")
    r = httpx.post(url + "/v1/chat/completions", content=body, headers={**AUTH, "Content-Type": "application/json; "
                                                                                              "charset=utf-8"})
    assert r.status_code == 200, r.text


def test_the_host_must_be_a_name_of_this_server(server):
    """DNS rebinding: a page whose name now points at 127.0.0.1 sends its own name as Host."""
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", "other.example:10", "a b"):
        refused(httpx.get(url + "/health", headers={"Host": host}), 421, "Host", "--allowed-hosts")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"LOCALHOST.:{port}", "casa.example",
                 "casa.example:443", "other.example:9"):
        assert httpx.get(url + "/health", headers={"Host": host}).status_code == 200, host
    assert Access().host_allowed(f"[::1]:{port}", ("::1", port))


def test_the_origin_of_a_browser_request_must_be_this_server(server):
    url, _ = server
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{int(url.rsplit(':', 1)[1]) + 1}"):
        refused(post_chat(url, headers={**AUTH, "Origin": origin}), 403, "Origin", "another site")
        refused(httpx.get(url + "/live/sessions/x/events", headers={**AUTH, "Origin": origin}), 403, "Origin")
    assert post_chat(url, headers={**AUTH, "Origin": url}).status_code == 200  # the page itself
    assert post_chat(url).status_code == 200  # no Origin: not a browser


def test_security_headers_on_every_response_and_a_page_without_inline_code(server):
    url, _ = server
    for r in (httpx.get(url + "/"), httpx.get(url + "/static/live.js"), post_chat(url),
              httpx.get(url + "/v1/nothing", headers=AUTH), httpx.get(url + "/v1/models")):
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert (r.headers["x-frame-options"], r.headers["x-content-type-options"],
                r.headers["referrer-policy"]) == ("DENY", "nosniff", "no-referrer")
    page = httpx.get(url + "/").text
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/static/live.js">']  # no inline script
    assert "<style" not in page and " style=" not in page and not re.search(r"\son[a-z]+=", page)


# ------------------------------------------------------------- connections
def closed_within(sock, seconds) -> bool:
    """Whether the server closes `sock` within `seconds` (whatever it sends first)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, TimeoutError, socket.timeout) as e:
        return not isinstance(e, (TimeoutError, socket.timeout))
    return True


def test_slow_and_idle_connections_are_closed_and_their_number_is_bounded(server):
    """150 slow sockets held for 60 s were never closed: now a connection has
    --header-timeout to send its headers, --keep-alive-timeout when idle, and
    at most --max-connections are open."""
    url, state = server
    host, port = url[len("http://"):].split(":")
    wait_for(lambda: health(url)["connections"] == 1, "the earlier tests' connections to close")  # this one
    counts = dict(state.counts)
    started = time.monotonic()
    slow = [socket.create_connection((host, int(port))) for _ in range(LIMITS.max_connections)]
    for sock in slow:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: " + host.encode())  # and never the end of the headers
    extra = socket.create_connection((host, int(port)))  # the limit is reached: closed at once
    assert closed_within(extra, 0.5)
    for _ in range(3):  # one of them trickles a byte at a time (slowloris): it is closed all the same
        slow[0].sendall(b"x")
        time.sleep(0.2)
    assert all(closed_within(sock, LIMITS.header_timeout + 1.0) for sock in slow)
    assert time.monotonic() - started < LIMITS.header_timeout + 2.0
    assert state.counts["header_timeouts"] - counts.get("header_timeouts", 0) == LIMITS.max_connections
    assert state.counts["connections_refused"] - counts.get("connections_refused", 0) == 1
    # an idle keep-alive connection is closed after --keep-alive-timeout; a request in time is answered
    with raw_request(url, "GET /health HTTP/1.1\n") as idle:
        status, _ = response_of(idle)
        assert status == 200 and closed_within(idle, LIMITS.keep_alive_timeout + 1.0)
    # a body that trickles is cut at --body-timeout (408), and the connection closed
    with raw_request(url, f"POST /v1/chat/completions HTTP/1.1\nAuthorization: Bearer {KEY}\n"
                          "Content-Type: application/json\nContent-Length: 1000\n", b'{"model": ') as sock:
        status, text = response_of(sock)
        assert status == 408 and "--body-timeout" in text and closed_within(sock, 1.0)
    assert post_chat(url).status_code == 200


# ----------------------------------------------------------- internal errors
def test_an_internal_error_shows_only_an_id_and_logs_one_traceback(server, monkeypatch):
    url, state = server

    def broken(*args, **kw):
        raise RuntimeError("secret detail /srv/models/private")

    monkeypatch.setattr(state.engine, "chat", broken)
    with captured_logs("casa.serve", "uvicorn.error") as records:
        r = post_chat(url)
        with httpx.stream("POST", url + "/v1/chat/completions", json={**GOOD, "stream": True}, headers=AUTH) as s:
            streamed = "".join(s.iter_text())
    error = refused(r, 500, None, "internal error (request id ")
    assert error["code"] == "internal_error" and "secret" not in r.text and "RuntimeError" not in r.text
    assert "internal error (request id " in streamed and "secret" not in streamed
    ids = [re.search(r"request id ([0-9a-f]{12})", text)[1] for text in (r.text, streamed)]
    tracebacks = [rec for rec in records if rec.exc_info]
    assert [rec.name for rec in tracebacks] == ["casa.serve", "casa.serve"]  # once each, never through uvicorn
    assert [ident in rec.getMessage() for rec, ident in zip(tracebacks, ids)] == [True, True]
    assert "secret detail" in str(tracebacks[0].exc_info[1])
