"""HTTP routes beside the page, on the same port (server.py puts them behind the access gate):

- `POST /v1/chat/completions` and `GET /v1/models`: the OpenAI chat API, served by the same
  backend as the page, so API and browser users share one batch;
- `GET /metrics`: Prometheus text; `GET /health`: "ok" or, with 503, "unhealthy" (nothing more:
  it is open to everyone).

Every answer is an OpenAI-style JSON error when anything is wrong with a request, whatever
bytes arrived: bad UTF-8, lone surrogates, bad JSON, wrong types, numbers beyond range.

Work is bounded and off the event loop: the body was bounded by the gate; parsing, the
conversation limits (`Limits.check_conversation`, the page's own) and `backend.submit` (which
tokenizes) run in one worker thread of a pool sized to --concurrency; waiting for a stream's
next event runs in a second bounded pool (never asyncio's default one). Every request carries
the server's deadline, and /v1 answers share one KV-cache salt per API key.

Work ends with its client: a streamed answer is cancelled when the client disconnects (the
response stops), a non-streamed one as soon as the server sees the disconnect while waiting.

Tool calling (ChatGLM3, GLM-4; `api_tools.py`, docs/tool-calling.md): `tools`, `tool_choice`,
assistant `tool_calls` and `role: "tool"` messages go to the engine, which lays them out and reads
the model's call; the answer carries `tool_calls` (streamed as OpenAI streams them, after the text)
with finish_reason "tool_calls". Other models refuse them with 400.

Honest endings: finish_reason "stop", "length" and "tool_calls" are passed through; every other
ending (an engine error, the deadline, a shutdown, a cancel) is an error. In a stream it is a final
`data: {"error": {...}}` event with no finish_reason and no `[DONE]` (the openai client raises
APIError on it), so a cut-off answer never looks complete; without streaming it is a JSON error,
503 while the backend is unhealthy or shutting down, else 500.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from typing import Any, Iterator, Optional

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from model_runtime.protocol import (ChatBackend, ChatEvent, ChatRequest, ChatStream, EngineBusy, InvalidRequest,
                                    Message, SamplingParams)

from .access import CLIENT_HEADER, BadJSON, parse_json
from .api_tools import (ToolRequestError, check_tools_supported, parse_tool_choice, parse_tools, tool_call_deltas,
                        tool_calls_json, tool_message_fields)
from .limits import MAX_STOP_CHARS, MAX_STOP_STRINGS, LimitExceeded, Limits

KNOWN_FIELDS = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
                "n", "stream", "stream_options", "user", "frequency_penalty", "presence_penalty", "tools",
                "tool_choice", "parallel_tool_calls"}
DEFAULT_MAX_TOKENS = 1024
RETRY_AFTER_S = 2  # told to clients refused as busy
DISCONNECT_POLL_S = 0.1  # how often a waiting non-streamed request looks for its client
SHOWN_VALUE_CHARS = 80  # of a client's value quoted back in an error message


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _clipped(text: str) -> str:
    return text if len(text) <= SHOWN_VALUE_CHARS else text[:SHOWN_VALUE_CHARS] + "…"


def _shown(value: Any) -> str:
    return _clipped(repr(value))


def _number(value, name: str, default, low: float, high: float, integer: bool = False):
    """value, or default when absent; APIError naming the field when it is out of range."""
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{name}' must be {kind} between {low} and {high}, got {_shown(value)}", param=name)
    return value


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text", ""), str) for p in content):
        return "".join(p.get("text", "") for p in content)
    raise APIError(400, f"messages[{index}].content must be a string or a list of text parts",
                   param=f"messages.[{index}].content")


def decode_body(raw: bytes, limits: Limits) -> Any:
    """Request bytes -> JSON value (access.parse_json's checks); APIError if not acceptable."""
    try:
        return parse_json(raw, limits.max_json_depth)
    except BadJSON as error:
        raise APIError(400, str(error), code="invalid_json") from None


def parse_chat_request(body: Any, model_name: str, limits: Limits = Limits(), cache_salt: Optional[str] = None,
                       supports_tools: bool = False) -> tuple[ChatRequest, bool, bool]:
    """A /v1/chat/completions body -> (request, stream?, include usage chunk?); APIError if invalid.
    supports_tools: the model can call functions (ChatGLM3, GLM-4); else tools are refused."""
    try:
        return _parse_chat_request(body, model_name, limits, cache_salt, supports_tools)
    except ToolRequestError as error:
        raise APIError(400, str(error), param=error.param) from None


def _parse_chat_request(body: Any, model_name: str, limits: Limits, cache_salt: Optional[str],
                        supports_tools: bool) -> tuple[ChatRequest, bool, bool]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {', '.join(map(_clipped, unknown))}",
                       param=unknown[0])
    if body.get("model") not in (None, model_name):
        raise APIError(404, f"The model {_shown(body['model'])} does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0) or isinstance(body.get(name), bool):
            raise APIError(400, f"'{name}' is not supported by this server (only 0)", param=name)
    if body.get("n", 1) != 1 or isinstance(body.get("n"), bool):
        raise APIError(400, "only n=1 is supported", param="n")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    messages = []
    for index, message in enumerate(raw_messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{index}] must be an object with role system, user, assistant or tool",
                           param=f"messages.[{index}].role")
        fields = tool_message_fields(message, index)
        content = "" if fields.get("tool_calls") and message.get("content") is None else _content(message, index)
        messages.append(Message(message["role"], content, **fields))
    limits.check_conversation([m.content + "".join(c.arguments for c in m.tool_calls) for m in messages])
    tools = parse_tools(body.get("tools"))
    tool_choice = parse_tool_choice(body.get("tool_choice"), tools)
    check_tools_supported(messages, tools, supports_tools)
    if not isinstance(body.get("parallel_tool_calls", True), bool):
        raise APIError(400, "'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"'stop' must be a string or a list of up to {MAX_STOP_STRINGS} non-empty strings "
                            f"of at most {MAX_STOP_CHARS} characters", param="stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = SamplingParams(
        max_length=1 << 30,  # bounded by the model's context; max_tokens bounds the answer
        max_new_tokens=_number(max_tokens, "max_tokens", DEFAULT_MAX_TOKENS, 1, 1 << 20, integer=True),
        temperature=_number(body.get("temperature"), "temperature", 1.0, 0, 2),
        top_p=_number(body.get("top_p"), "top_p", 1.0, 0, 1),
        top_k=0,
        seed=_number(body.get("seed"), "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
        stop=tuple(stop),
    )
    if sampling.top_p == 0:
        raise APIError(400, "'top_p' must be greater than 0", param="top_p")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError(400, "'stream' must be a boolean and 'stream_options' an object", param="stream")
    request = ChatRequest(messages=tuple(messages), sampling=sampling, request_id=f"chatcmpl-{uuid.uuid4().hex}",
                          deadline_s=limits.request_timeout_s, cache_salt=cache_salt, tools=tools,
                          tool_choice=tool_choice)
    return request, stream, bool(options.get("include_usage"))


def _usage(event: ChatEvent) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def _is_complete(event: ChatEvent) -> bool:
    """Only a natural end (a call included) or a length cut may look like a finished answer."""
    return event.finish_reason in ("stop", "length", "tool_calls")


def _error_from(event: Optional[ChatEvent], backend: ChatBackend) -> APIError:
    """The error for an answer that did not end as "stop" or "length"."""
    message = (event.error if event is not None else None) or \
        ("the answer was cancelled" if event is not None and event.finish_reason == "cancelled"
         else "the answer ended without finishing")
    if backend.health() is not None:
        return APIError(503, message, kind="server_error", code="unavailable", headers={"Retry-After": "5"})
    return APIError(500, message, kind="server_error")


def stats_as_prometheus(stats: dict, prefix: str = "chatglm_") -> str:
    """Engine stats -> Prometheus text exposition (counters end in _total)."""
    lines = []
    for name, value in stats.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        kind = "counter" if name.endswith(("_total", "_sum", "_count")) else "gauge"
        lines += [f"# TYPE {prefix}{name} {kind}", f"{prefix}{name} {value}"]
    return "\n".join(lines) + "\n"


def add_api_routes(app: FastAPI, backend: ChatBackend, *, limits: Limits = Limits(), cache_salt: Optional[str] = None,
                   concurrency: int = 64, max_streams: int = 256, chat_unavailable: Optional[str] = None) -> None:
    """Mount the OpenAI routes, /metrics and /health on `app` (access is the gate's business).
    concurrency: requests parsed and tokenized at once; max_streams: /v1 answers waited on at
    once (each waits in a thread of its own pool); chat_unavailable: why this server answers no
    /v1 chat completions (503 with that message; ZeroGPU), None when it does."""
    work = anyio.CapacityLimiter(concurrency)
    waits = anyio.CapacityLimiter(max_streams)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return APIError(error.status_code, str(error.detail), headers=error.headers).response()

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception):
        return APIError(500, f"internal error: {type(error).__name__}", kind="server_error").response()

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": backend.info.name, "object": "model", "created": 0,
                                            "owned_by": "chatglm-webdemo",
                                            "fine_tunes": list(backend.info.fine_tunes)}]}

    def submit(raw: bytes, client: Optional[str]) -> tuple[ChatRequest, ChatStream, bool, bool]:
        """Parse, check and submit (tokenizing): the blocking part of a request, in a worker."""
        chat_request, stream, include_usage = parse_chat_request(decode_body(raw, limits), backend.info.name, limits,
                                                                 cache_salt, backend.info.supports_tools)
        chat_request = replace(chat_request, client=client)
        try:
            return chat_request, backend.submit(chat_request), stream, include_usage
        except InvalidRequest as error:
            raise APIError(400, str(error)) from None
        except EngineBusy as error:
            status, code = (429, "busy") if backend.health() is None else (503, "unavailable")
            raise APIError(status, str(error), kind="server_overloaded", code=code,
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if chat_unavailable:
            return APIError(503, chat_unavailable, kind="server_error", code="unavailable").response()
        content_type = request.headers.get("content-type")
        if content_type is None or content_type.split(";")[0].strip().lower() != "application/json":
            # a browser sends a cross-site POST without asking first only for other types
            return APIError(415, f"the body must be sent as Content-Type: application/json, not "
                                 f"{_shown(content_type or 'none')}").response()
        raw = await request.body()
        client = request.headers.get(CLIENT_HEADER.decode())
        try:
            chat_request, handle, stream, include_usage = await anyio.to_thread.run_sync(submit, raw, client,
                                                                                         limiter=work)
        except APIError as error:
            return error.response()
        except LimitExceeded as error:
            return APIError(400, str(error), param="messages", code="limit_exceeded").response()
        created = int(time.time())
        if stream:
            chunks = _sse_chunks(handle, chat_request.request_id, backend, created, include_usage, waits)
            return StreamingResponse(chunks, media_type="text/event-stream")
        last = await _last_event(handle, request, waits)
        if last is None or not _is_complete(last):
            return _error_from(last, backend).response()
        return {"id": chat_request.request_id, "object": "chat.completion", "created": created,
                "model": backend.info.name, "usage": _usage(last),
                "choices": [{"index": 0, "message": _answer_message(last), "finish_reason": last.finish_reason,
                             "logprobs": None}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(stats_as_prometheus(backend.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health():
        if backend.health() is not None:
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return {"status": "ok"}


def _answer_message(event: ChatEvent) -> dict:
    if not event.tool_calls:
        return {"role": "assistant", "content": event.text, **_reasoning(event.reasoning)}
    return {"role": "assistant", "content": event.text or None, **_reasoning(event.reasoning),
            "tool_calls": tool_calls_json(event.tool_calls)}


def _reasoning(thinking: str) -> dict:
    """A reasoning model's thinking beside `content`, under the field name vLLM and other
    OpenAI-compatible servers use (`reasoning_content`); nothing for the others."""
    return {"reasoning_content": thinking} if thinking else {}


def _final_event(handle: ChatStream) -> Optional[ChatEvent]:
    last = None
    for last in handle:
        pass
    return last


async def _last_event(handle: ChatStream, request: Request, waits: anyio.CapacityLimiter) -> Optional[ChatEvent]:
    """The stream's last event; if the client disconnects first, the request is cancelled (its
    slot or queue place freed at once) and the stream's cancelled ending returned."""
    async def cancel_when_client_leaves() -> None:
        while not await request.is_disconnected():
            await anyio.sleep(DISCONNECT_POLL_S)
        handle.cancel()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(cancel_when_client_leaves)
            last = await anyio.to_thread.run_sync(_final_event, handle, limiter=waits, abandon_on_cancel=True)
            group.cancel_scope.cancel()
        return last
    finally:
        handle.cancel()  # no-op once finished; ends the work if this task itself was cancelled


async def _sse_chunks(handle: ChatStream, request_id: str, backend: ChatBackend, created: int, include_usage: bool,
                      waits: anyio.CapacityLimiter):
    """Server-sent events for a streamed completion; a client that goes away cancels the work."""
    events: Iterator[ChatEvent] = iter(handle)
    model = backend.info.name

    def chunk(delta: dict, finish_reason=None, usage=None) -> str:
        payload = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                                  "logprobs": None}]}
        if usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await anyio.to_thread.run_sync(next, events, None, limiter=waits, abandon_on_cancel=True)
            if event is not None and event.kind == "delta" and event.reasoning_delta:
                yield chunk(_reasoning(event.reasoning_delta))
            if event is not None and event.kind == "delta" and event.delta:
                yield chunk({"content": event.delta})
            if event is not None and not event.finished:
                continue
            if event is None or not _is_complete(event):
                yield f"data: {json.dumps(_error_from(event, backend).body(), ensure_ascii=False)}\n\n"
                return
            if event.reasoning_delta:
                yield chunk(_reasoning(event.reasoning_delta))
            last_delta = {"content": event.delta} if event.delta else {}
            if event.tool_calls:  # OpenAI's order: text, then each call's name, then its arguments
                for delta in ([last_delta] if last_delta else []) + tool_call_deltas(event.tool_calls):
                    yield chunk(delta)
                last_delta = {}
            yield chunk(last_delta, event.finish_reason)
            if include_usage:
                yield chunk({}, usage=_usage(event))
            yield "data: [DONE]\n\n"
            return
    finally:
        handle.cancel()  # no-op once finished; stops the model when the client disconnected
