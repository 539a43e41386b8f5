"""The OpenAI-compatible API: `GET /v1/models`, `GET /v1/models/{id}` and
`POST /v1/chat/completions` (text and `image_url` parts, several images and
turns, `max_tokens`, `temperature`, `top_p`, `seed`, `stop`, `stream`).

Design decisions:
- Requests are validated by hand, field by field, so that each refusal names
  the field (`messages[1].content[0].image_url.url`) and says what is wrong;
  fields this server does not use (`user`, `logit_bias`, ...) are ignored, as
  an OpenAI-compatible server does, except those that would change the answer
  (`n` > 1, `tools`), which are refused.
- `temperature` defaults to 1 and `top_p` to 1, as in the OpenAI API; 0 is
  greedy. `max_tokens` (or `max_completion_tokens`) defaults to, and is
  capped by, `--max-tokens`.
- `stop` strings end the reply where they start; a streamed reply holds back
  any tail that could begin a stop string (or an incomplete UTF-8 character),
  so no stop text is ever sent.
- `usage.prompt_tokens` counts the text tokens of the rendered conversation
  plus the image tokens (`tokens_per_image` per image), as OpenAI counts
  images in the prompt; `completion_tokens` counts every sampled token.
- Admission before work. A request is checked in this order, and nothing
  expensive runs before it holds a slot:
  1. the body: JSON, its size, its deadline (`http.read_json`);
  2. the fields, cheap checks only: model, roles, parts, `max_tokens`,
     `seed` (int64), ... and the conversation's size in characters
     (`Limits.max_prompt_chars`, derived from `--max-prompt-tokens`) and
     images (`--max-images`), all without tokenizing or decoding anything;
  3. a slot, or a place in the queue (429 when full, 503 after the wait);
  4. on the slot's worker: every image's header (`--max-image-pixels`, and
     `--max-request-pixels` for their sum), then the images decoded, then
     the conversation tokenized and counted (`--max-prompt-tokens`);
  5. generation.
  A refusal in step 4 frees the slot; any refusal hands the freed heap
  back to the system once the server is idle.
- A client that disconnects (streaming or not) stops its generation at the
  next token; the slot is freed when the worker has returned.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from casa.serve.engine import ChatResult, Turn
from casa.serve.http import (
    ApiError,
    EventStream,
    error_body,
    read_json,
    sse,
    until_disconnect,
)
from casa.serve.limits import shown
from casa.serve.media import MediaError, load_images
from casa.serve.state import ClientGone, ServeState

__all__ = ["ChatRequest", "StopText", "parse_chat_request", "routes"]

MAX_MESSAGES = 256
MAX_STOPS = 4
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as the OpenAI API; torch's generator takes them all
log = logging.getLogger("casa.serve")


# ------------------------------------------------------------- validation
def _number(body: dict, key: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{key}={shown(value)}: expected a number", param=key)
    if not (low < value if low_open else low <= value) or value > high:
        bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise ApiError(400, f"{key}={shown(value)}: must be in {bound}", param=key)
    return float(value)


def _text_parts(content, where: str, *, images: bool) -> tuple[str, list[tuple[str, str]]]:
    """(text, [(image URL, where)]) of a message's content: a string or a list of parts."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(400, f"{where}: expected a string or a list of content parts", param=where)
    texts, urls = [], []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{at}.text: expected a string", param=f"{at}.text")
            texts.append(part["text"])
        elif kind == "image_url" and images:
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise ApiError(400, f"{at}.image_url.url: expected a URL string", param=f"{at}.image_url.url")
            urls.append((url, f"{at}.image_url.url"))
        elif kind == "image_url":
            raise ApiError(400, f"{at}: images are allowed in user messages only", param=at)
        else:
            raise ApiError(400, f"{at}: unsupported content part type {shown(kind)} (expected 'text' or "
                                "'image_url')", param=at)
    return "".join(texts), urls


class ChatRequest:
    """A validated chat completion request (images not loaded yet)."""

    def __init__(self, body: dict, *, model: str, limits):
        name = body.get("model")
        if not isinstance(name, str):
            raise ApiError(400, "model: required, the model's id (GET /v1/models)", param="model")
        if name != model:
            raise ApiError(404, f"model {shown(name)} does not exist; this server serves {model!r} (GET /v1/models)",
                           param="model", code="model_not_found")
        if body.get("n") not in (None, 1):
            raise ApiError(400, f"n={shown(body['n'])}: this server returns one choice (n=1)", param="n")
        for key in ("tools", "functions"):
            if body.get(key):
                raise ApiError(400, f"{key}: tool calling is not supported by this server", param=key)
        self.turns, self.image_urls = self._messages(body.get("messages"), limits)
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        value = body.get(key)
        if value is None:
            value = limits.max_tokens
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limits.max_tokens:
            raise ApiError(400, f"{key}={shown(value)}: must be an integer in [1, {limits.max_tokens}] (the "
                                "server's --max-tokens)", param=key)
        self.max_tokens = value
        self.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        self.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
            raise ApiError(400, f"seed={shown(seed)}: expected an integer in [-2**63, 2**63 - 1]", param="seed")
        self.seed = seed
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if (not isinstance(stops, list) or len(stops) > MAX_STOPS
                or not all(isinstance(s, str) and s for s in stops)):
            raise ApiError(400, f"stop={shown(stop)}: expected a non-empty string or a list of at most {MAX_STOPS}",
                           param="stop")
        self.stops = stops
        self.stream = body.get("stream") or False
        if not isinstance(self.stream, bool):
            raise ApiError(400, f"stream={shown(self.stream)}: expected true or false", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options: expected an object", param="stream_options")
        self.include_usage = bool(options.get("include_usage"))

    @staticmethod
    def _messages(messages, limits) -> tuple[list[Turn], list[tuple[int, str, str]]]:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages: required, a non-empty list", param="messages")
        if len(messages) > MAX_MESSAGES:
            raise ApiError(400, f"messages: {len(messages)} messages, at most {MAX_MESSAGES}", param="messages")
        turns, urls = [], []  # urls: (turn index, URL, where)
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            role = message.get("role") if isinstance(message, dict) else None
            role = "system" if role == "developer" else role
            if role not in ("system", "user", "assistant"):
                raise ApiError(400, f"{where}.role={shown(role)}: expected 'system', 'user' or 'assistant'",
                               param=f"{where}.role")
            text, found = _text_parts(message.get("content"), f"{where}.content", images=role == "user")
            urls += [(len(turns), url, at) for url, at in found]
            turns.append(Turn(role, text))
        if turns[-1].role != "user":
            raise ApiError(400, f"messages[{len(turns) - 1}]: the last message must be a user message",
                           param=f"messages[{len(turns) - 1}].role")
        if len(urls) > limits.max_images:
            raise ApiError(400, f"messages: {len(urls)} images, at most {limits.max_images} per request "
                                "(--max-images)", param="messages")
        chars = sum(len(t.text) for t in turns)
        if chars > limits.max_prompt_chars:  # refused before tokenizing: see the module doc of limits
            raise ApiError(400, f"messages: the conversation's text is {chars} characters, above the limit of "
                                f"{limits.max_prompt_chars} (--max-prompt-tokens {limits.max_prompt_tokens} at "
                                f"{limits.max_prompt_chars // limits.max_prompt_tokens} characters a token)",
                           param="messages")
        return turns, urls

    def prepare(self, state: ServeState) -> None:
        """Decode the images into their turns and check the conversation's size in
        tokens (raises ApiError naming the image or the limit). Steps 4 of the
        module doc: CPU work, on the slot's worker thread."""
        lim = state.limits
        try:
            images = load_images([(url, where) for _, url, where in self.image_urls], state.media,
                                 max_pixels=lim.max_image_pixels, max_total_pixels=lim.max_request_pixels)
        except MediaError as e:
            raise ApiError(e.status, str(e), param=e.what) from None
        for (turn, _, _), image in zip(self.image_urls, images):
            self.turns[turn].images.append(image)
        size = state.engine.prompt_tokens(self.turns)
        if size > lim.max_prompt_tokens:
            raise ApiError(400, f"messages: the conversation is {size} tokens (text and images), above the limit "
                                f"of {lim.max_prompt_tokens} (--max-prompt-tokens)", param="messages")


def parse_chat_request(body: dict, state: ServeState) -> ChatRequest:
    return ChatRequest(body, model=state.engine.name, limits=state.limits)


class StopText:
    """Incremental reply text with OpenAI `stop` strings (see the module doc)."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.sent = 0  # characters of the text already handed out
        self.stopped = False
        self.text = ""  # the reply so far, cut at a stop string

    def feed(self, full: str) -> str:
        """The new text that is safe to send, given the whole text so far."""
        hits = [i for s in self.stops if (i := full.find(s)) >= 0]
        if hits:
            end, self.stopped = min(hits), True
        else:
            end = len(full)
            for s in self.stops:  # hold back a tail that may begin a stop string
                for k in range(min(len(s) - 1, len(full)), 0, -1):
                    if full.endswith(s[:k]):
                        end = min(end, len(full) - k)
                        break
            while end > self.sent and full[end - 1] == "\ufffd":  # an incomplete UTF-8 character
                end -= 1
        self.text = full[: max(end, self.sent)]
        piece = full[self.sent : end]
        self.sent = max(self.sent, end)
        return piece

    def finish(self, full: str) -> str:
        """What is left to send once generation ended."""
        if self.stopped:
            return ""
        piece = full[self.sent :]
        self.text, self.sent = full, len(full)
        return piece


# ----------------------------------------------------------------- routes
def _state(request: Request) -> ServeState:
    return request.app.state.casa


def _model_card(state: ServeState) -> dict:
    return {"id": state.engine.name, "object": "model", "created": state.engine.created, "owned_by": "casa"}


async def list_models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_model_card(_state(request))]})


async def get_model(request: Request) -> JSONResponse:
    state = _state(request)
    name = request.path_params["model"]
    if name != state.engine.name:
        raise ApiError(404, f"model {name!r} does not exist; this server serves {state.engine.name!r}",
                       param="model", code="model_not_found")
    return JSONResponse(_model_card(state))


def _usage(result: ChatResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


async def chat_completions(request: Request):
    state = _state(request)
    body = await read_json(request, limit=state.limits.max_request_bytes, timeout=state.limits.body_timeout)
    req = parse_chat_request(body, state)
    del body  # the validated request keeps what it needs
    acquiring = asyncio.ensure_future(state.acquire_slot())
    try:
        await until_disconnect(request, acquiring)
    except ConnectionAbortedError:  # the client left while queued: give its place (or slot) back
        acquiring.cancel()
        await asyncio.wait([acquiring])  # a slot handed over meanwhile is kept by a cancelled wait: release it
        if not acquiring.cancelled() and acquiring.exception() is None:
            state.release()
        return Response(status_code=499)  # "client closed request": nobody reads it
    preparing = state.in_slot(req.prepare, state)  # images and tokens: only now, holding the slot
    try:
        await until_disconnect(request, preparing)
    except ConnectionAbortedError:
        preparing.add_done_callback(lambda _: state.release())
        return Response(status_code=499)
    except BaseException:  # refused (images, tokens): the slot goes to the next request
        state.release()
        raise
    loop = asyncio.get_running_loop()
    stopper = StopText(req.stops)
    gone = False
    pieces: asyncio.Queue = asyncio.Queue()

    def on_text(full: str) -> bool:  # on the worker thread, after each token
        if gone:
            raise ClientGone
        piece = stopper.feed(full)
        if piece and req.stream:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)
        return stopper.stopped

    def generate() -> ChatResult:
        return state.engine.chat(req.turns, max_tokens=req.max_tokens, temperature=req.temperature,
                                 top_p=req.top_p, seed=req.seed, on_text=on_text)

    future = state.run_session(generate)
    future.add_done_callback(lambda f: state.count_outcome(f, "chat"))
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": ident, "created": created, "model": state.engine.name}

    if not req.stream:
        try:
            result = await until_disconnect(request, future)
        except ConnectionAbortedError:
            gone = True  # the worker stops at its next token
            return Response(status_code=499)
        text = stopper.text if stopper.stopped else result.text
        return JSONResponse({**head, "object": "chat.completion", "usage": _usage(result), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": result.finish_reason,
             "logprobs": None}]})

    future.add_done_callback(lambda _: pieces.put_nowait(None))

    def chunk(delta: dict, finish: str | None = None) -> str:
        return sse({**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    async def events():
        yield chunk({"role": "assistant", "content": ""})
        while (piece := await pieces.get()) is not None:
            yield chunk({"content": piece})
        try:
            result = future.result()
        except Exception:  # noqa: BLE001 - the status line is sent: report in the stream
            ident = uuid.uuid4().hex[:12]
            log.exception("internal error %s in a streamed chat completion", ident)
            yield sse(error_body(500, f"internal error (request id {ident}; the server's log has the details)",
                                 code="internal_error"))
            yield sse("[DONE]")
            return
        rest = stopper.finish(result.text)
        if rest:
            yield chunk({"content": rest})
        yield chunk({}, result.finish_reason)
        if req.include_usage:
            yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(result)})
        yield sse("[DONE]")

    def on_close() -> None:
        nonlocal gone
        gone = not future.done()

    return EventStream(events(), on_close=on_close)


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
]
