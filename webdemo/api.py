"""HTTP routes beside the page, on the same FastAPI app and port:

- `POST /v1/chat/completions` and `GET /v1/models`: the OpenAI chat API, served by the same
  backend as the page, so API and browser users share one batch;
- `GET /metrics`: Prometheus text; `GET /health`: liveness for load balancers and Spaces.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import Any, Iterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from model_runtime.protocol import (ChatBackend, ChatEvent, ChatRequest, EngineBusy, InvalidRequest, Message,
                                    SamplingParams)

KNOWN_FIELDS = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
                "n", "stream", "stream_options", "user", "frequency_penalty", "presence_penalty"}
DEFAULT_MAX_TOKENS = 1024


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _number(value, name: str, default, low: float, high: float, integer: bool = False):
    """value, or default when absent; APIError naming the field when it is out of range."""
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{name}' must be {kind} between {low} and {high}, got {value!r}", param=name)
    return value


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise APIError(400, f"messages[{index}].content must be a string or a list of text parts",
                   param=f"messages.[{index}].content")


def parse_chat_request(body: Any, model_name: str) -> tuple[ChatRequest, bool, bool]:
    """A /v1/chat/completions body -> (request, stream?, include usage chunk?); APIError if invalid."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0])
    if body.get("model") not in (None, model_name):
        raise APIError(404, f"The model '{body['model']}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise APIError(400, f"'{name}' is not supported by this server (only 0)", param=name)
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    messages = []
    for index, message in enumerate(raw_messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{index}] must be an object with role system, user or assistant",
                           param=f"messages.[{index}].role")
        messages.append(Message(message["role"], _content(message, index)))
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
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
    request = ChatRequest(messages=tuple(messages), sampling=sampling, request_id=f"chatcmpl-{uuid.uuid4().hex}")
    return request, stream, bool(options.get("include_usage"))


def _usage(event: ChatEvent) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def _finish_reason(event: ChatEvent) -> str:
    return "length" if event.finish_reason == "length" else "stop"


def _error_from(event: ChatEvent) -> APIError:
    return APIError(500, event.error or "generation failed", kind="server_error")


def stats_as_prometheus(stats: dict, prefix: str = "chatglm_") -> str:
    """Engine stats -> Prometheus text exposition (counters end in _total)."""
    lines = []
    for name, value in stats.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        kind = "counter" if name.endswith(("_total", "_sum", "_count")) else "gauge"
        lines += [f"# TYPE {prefix}{name} {kind}", f"{prefix}{name} {value}"]
    return "\n".join(lines) + "\n"


def add_api_routes(app: FastAPI, backend: ChatBackend, api_key: Optional[str] = None) -> None:
    """Mount the OpenAI routes, /metrics and /health on the page's FastAPI app."""

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    @app.get("/v1/models")
    async def list_models(request: Request):
        try:
            check_key(request)
        except APIError as error:
            return error.response()
        return {"object": "list", "data": [{"id": backend.info.name, "object": "model", "created": 0,
                                            "owned_by": "chatglm-webdemo"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_key(request)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise APIError(400, "the request body is not valid JSON") from None
            chat_request, stream, include_usage = parse_chat_request(body, backend.info.name)
            try:
                handle = backend.submit(chat_request)
            except InvalidRequest as error:
                raise APIError(400, str(error)) from None
            except EngineBusy as error:
                raise APIError(429, str(error), kind="server_overloaded", code="busy") from None
        except APIError as error:
            return error.response()
        created = int(time.time())
        if stream:
            chunks = _sse_chunks(handle, chat_request.request_id, backend.info.name, created, include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        last = await run_in_threadpool(lambda: list(handle)[-1])
        if last.finish_reason == "error":
            return _error_from(last).response()
        return {"id": chat_request.request_id, "object": "chat.completion", "created": created,
                "model": backend.info.name, "usage": _usage(last),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": last.text},
                             "finish_reason": _finish_reason(last), "logprobs": None}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(stats_as_prometheus(backend.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": backend.info.name}


async def _sse_chunks(handle, request_id: str, model: str, created: int, include_usage: bool):
    """Server-sent events for a streamed completion; a client that goes away cancels the work."""
    events: Iterator[ChatEvent] = iter(handle)

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
            event = await asyncio.to_thread(next, events)
            if event.kind == "delta" and event.delta:
                yield chunk({"content": event.delta})
            if not event.finished:
                continue
            if event.finish_reason == "error":
                yield f"data: {json.dumps(_error_from(event).body())}\n\n"
                return
            yield chunk({"content": event.delta} if event.delta else {}, _finish_reason(event))
            if include_usage:
                yield chunk({}, usage=_usage(event))
            yield "data: [DONE]\n\n"
            return
    finally:
        handle.cancel()  # no-op once finished; stops the model when the client disconnected
