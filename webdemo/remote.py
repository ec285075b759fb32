"""A ChatBackend that streams from any OpenAI-compatible server (vLLM, llama.cpp's server, this
project's own /v1 API), so the page can front a remote cluster instead of a local model.

Each request streams in its own thread; cancel() closes the HTTP stream, which is how such
servers learn to stop generating. Remote failures become "error" events in the chat.
"""
from __future__ import annotations

import json
import queue
import threading
from typing import Iterator, Optional

import httpx

from model_runtime.protocol import ChatEvent, ChatRequest, InvalidRequest, ModelInfo


class RemoteStream:
    def __init__(self, backend: "OpenAIBackend", request: ChatRequest):
        self.request_id = request.request_id
        self._backend = backend
        self._request = request
        self._events: "queue.Queue[ChatEvent]" = queue.Queue()
        self._cancelled = threading.Event()
        self._response: Optional[httpx.Response] = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"remote-{self.request_id}")
        self._thread.start()

    def __iter__(self) -> Iterator[ChatEvent]:
        finished = False
        try:
            while not finished:
                event = self._events.get()
                finished = event.finished
                yield event
        finally:
            if not finished:
                self.cancel()

    def cancel(self) -> None:
        self._cancelled.set()
        response = self._response
        if response is not None:
            response.close()  # the upstream server sees the disconnect and stops

    def _run(self) -> None:
        text, usage, reason = "", {}, None
        try:
            with self._backend.client.stream("POST", "/chat/completions", json=self._body()) as response:
                self._response = response
                if response.status_code != 200:
                    response.read()
                    raise RuntimeError(_error_message(response))
                for line in response.iter_lines():
                    if self._cancelled.is_set():
                        break
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"].get("message", "the remote server failed"))
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices", []):
                        delta = (choice.get("delta") or {}).get("content") or ""
                        reason = choice.get("finish_reason") or reason
                        if delta:
                            text += delta
                            self._put("delta", text, usage, delta=delta)
        except Exception as error:
            if not self._cancelled.is_set():
                self._put("done", text, usage, finish_reason="error",
                          error=f"the model server at {self._backend.base_url} failed: {error}")
                return
        if self._cancelled.is_set():
            reason = "cancelled"
        elif reason != "length":
            reason = "stop"
        self._put("done", text, usage, finish_reason=reason)

    def _put(self, kind, text, usage, **fields) -> None:
        self._events.put(ChatEvent(kind=kind, request_id=self.request_id, text=text,
                                   prompt_tokens=usage.get("prompt_tokens", 0),
                                   completion_tokens=usage.get("completion_tokens", 0), **fields))

    def _body(self) -> dict:
        sampling = self._request.sampling
        body = {"model": self._backend.info.name, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": m.role, "content": m.content} for m in self._request.messages],
                "temperature": sampling.temperature, "top_p": sampling.top_p}
        # max_length counts prompt plus answer, which only the server can count: it bounds the
        # answer alone here, and is left out when it is the whole context (servers such as vLLM
        # refuse max_tokens that do not fit beside the prompt).
        limit = sampling.max_new_tokens or sampling.max_length
        if limit < self._backend.info.max_sequence_length:
            body["max_tokens"] = limit
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        return body


def _error_message(response: httpx.Response) -> str:
    try:
        return f"HTTP {response.status_code}: {response.json()['error']['message']}"
    except Exception:
        return f"HTTP {response.status_code}: {response.text[:200]}"


class OpenAIBackend:
    """The page's backend when the model runs elsewhere. The model's context length is not
    part of the OpenAI API, so it is given (`context_length`) for the page's slider."""

    def __init__(self, api_base: str, api_key: Optional[str] = None, model: Optional[str] = None,
                 context_length: int = 8192, timeout: float = 600.0):
        self.base_url = api_base.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout, connect=10))
        self.info = ModelInfo(name=model or self._first_model(), max_sequence_length=context_length,
                              supports_system_prompt=True)
        self._streams: dict[str, RemoteStream] = {}

    def _first_model(self) -> str:
        try:
            response = self.client.get("/models")
            response.raise_for_status()
            return response.json()["data"][0]["id"]
        except Exception as error:
            raise ConnectionError(f"cannot list the models of {self.base_url} ({error}); check --api-base "
                                  "(it usually ends in /v1) and --api-key, or name the model with --model") from None

    def submit(self, request: ChatRequest) -> RemoteStream:
        request.sampling.validate()
        if not request.messages or request.messages[-1].role != "user":
            raise InvalidRequest("the conversation must end with a user message")
        stream = RemoteStream(self, request)
        self._streams = {rid: s for rid, s in self._streams.items() if s._thread.is_alive()}
        self._streams[request.request_id] = stream
        return stream

    def cancel(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.cancel()

    def stats(self) -> dict:
        return {"active_sequences": sum(s._thread.is_alive() for s in self._streams.values())}

    def close(self) -> None:
        for stream in list(self._streams.values()):
            stream.cancel()
        self.client.close()

