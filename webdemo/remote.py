"""A ChatBackend that streams from any OpenAI-compatible server (vLLM, llama.cpp's server, this
project's own /v1 API), so the page can front a remote cluster instead of a local model.

Each request streams in its own thread; cancel() closes the HTTP stream, which is how such
servers learn to stop generating. Endings stay honest: only the server's own "stop", "length"
or "tool_calls" count as complete; a stream that breaks, ends without a finish_reason, reports
any other reason, passes its deadline or is cut by close() ends with "error".

Both ways it carries what reasoning and tool-calling models add (GLM-Z1, GLM-4-0414 behind vLLM
or SGLang): the request's tools, tool_choice, assistant tool calls and tool results go to the
server as OpenAI fields; the server's `reasoning_content` deltas (vLLM's name; `reasoning` too)
become the events' thinking, its streamed `tool_calls` fragments the answer's calls.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from typing import Iterator, Optional

import httpx

from model_runtime.protocol import ChatEvent, ChatRequest, EngineBusy, InvalidRequest, ModelInfo, ToolCall

STREAM_POLL_S = 0.5  # a waiting stream checks this often that its thread still lives
HEALTH_PROBE_S = 10.0  # health() asks the server for its models at most this often
SHUTDOWN_MESSAGE = "the server is shutting down; this answer was cut off"


class RemoteStream:
    def __init__(self, backend: "OpenAIBackend", request: ChatRequest):
        self.request_id = request.request_id
        self._backend = backend
        self._request = request
        self._events: "queue.Queue[ChatEvent]" = queue.Queue()
        self._cancelled = threading.Event()
        self._cut_reason: Optional[str] = None  # set when the answer is cut off, not cancelled
        self._response: Optional[httpx.Response] = None
        self._reasoning = ""  # the server's reasoning_content so far
        self._calls: dict[int, dict] = {}  # streamed tool-call fragments, by their index
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"remote-{self.request_id}")
        self._deadline: Optional[threading.Timer] = None
        if request.deadline_s is not None:
            self._deadline = threading.Timer(request.deadline_s, self.cut,
                                             args=(f"time limit of {request.deadline_s:g} s reached",))
            self._deadline.daemon = True
            self._deadline.start()
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout=timeout)

    def __iter__(self) -> Iterator[ChatEvent]:
        finished = False
        try:
            while not finished:
                try:
                    event = self._events.get(timeout=STREAM_POLL_S)
                except queue.Empty:
                    if not self._thread.is_alive() and self._events.empty():  # died without a last word
                        self._put("done", "", {}, finish_reason="error", error="the remote stream stopped")
                    continue
                finished = event.finished
                yield event
        finally:
            if not finished:
                self.cancel()

    def cancel(self) -> None:
        self._cancelled.set()
        self._close_response()

    def cut(self, reason: str) -> None:
        """End the answer as cut off ("error" with reason), unless it has already ended."""
        if self._cut_reason is None:
            self._cut_reason = reason
        self._cancelled.set()
        self._close_response()

    def _close_response(self) -> None:
        response = self._response
        if response is not None:
            response.close()  # the upstream server sees the disconnect and stops

    def _run(self) -> None:
        text, usage, reason = "", {}, None
        try:
            with self._backend.client.stream("POST", "/chat/completions", json=self._body()) as response:
                self._response = response
                if self._cancelled.is_set():  # cancelled or cut while connecting
                    response.close()
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
                        fields = choice.get("delta") or {}
                        delta = fields.get("content") or ""
                        thought = fields.get("reasoning_content") or fields.get("reasoning") or ""
                        self._add_call_fragments(fields.get("tool_calls") or ())
                        reason = choice.get("finish_reason") or reason
                        self._reasoning += thought
                        text += delta
                        if delta or thought:
                            self._put("delta", text, usage, delta=delta, reasoning_delta=thought)
        except Exception as error:
            if not self._cancelled.is_set():
                self._end(text, usage, "error", f"the model server at {self._backend.base_url} failed: {error}")
                return
        if self._cut_reason is not None:
            self._end(text, usage, "error", self._cut_reason)
        elif self._cancelled.is_set():
            self._end(text, usage, "cancelled")
        elif reason in ("stop", "length"):
            self._end(text, usage, reason)
        elif reason == "tool_calls" and self._calls:
            self._end(text, usage, reason, tool_calls=self._tool_calls())
        elif reason is None:
            self._end(text, usage, "error", f"the model server at {self._backend.base_url} ended the answer "
                                            "without saying why; it may be cut off")
        else:
            self._end(text, usage, "error", f"the model server at {self._backend.base_url} ended the answer: {reason}")

    def _add_call_fragments(self, fragments) -> None:
        """OpenAI streams a call as fragments: its index, id and name first, then pieces of the
        arguments."""
        for fragment in fragments:
            call = self._calls.setdefault(fragment.get("index", 0), {"id": "", "name": "", "arguments": ""})
            function = fragment.get("function") or {}
            call["id"] = fragment.get("id") or call["id"]
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""

    def _tool_calls(self) -> tuple[ToolCall, ...]:
        return tuple(ToolCall(call["id"] or f"call_{self.request_id}_{index}", call["name"], call["arguments"] or "{}")
                     for index, call in sorted(self._calls.items()))

    def _end(self, text, usage, reason, error: Optional[str] = None, tool_calls: tuple[ToolCall, ...] = ()) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._put("done", text, usage, finish_reason=reason, error=error, tool_calls=tool_calls)

    def _put(self, kind, text, usage, **fields) -> None:
        self._events.put(ChatEvent(kind=kind, request_id=self.request_id, text=text,
                                   prompt_tokens=usage.get("prompt_tokens", 0),
                                   completion_tokens=usage.get("completion_tokens", 0),
                                   reasoning=self._reasoning, **fields))

    def _body(self) -> dict:
        sampling = self._request.sampling
        body = {"model": self._backend.info.name, "stream": True, "stream_options": {"include_usage": True},
                "messages": [_message_json(m) for m in self._request.messages],
                "temperature": sampling.temperature, "top_p": sampling.top_p}
        if self._request.tools:
            body["tools"] = [{"type": "function", "function": json.loads(tool.function_json)}
                             for tool in self._request.tools]
            choice = self._request.tool_choice
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}} \
                if choice.mode == "function" else choice.mode
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


def _message_json(message) -> dict:
    """A conversation message as OpenAI's API takes it (calls and results included)."""
    out = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["content"] = message.content or None
        out["tool_calls"] = [{"id": call.id, "type": "function",
                              "function": {"name": call.name, "arguments": call.arguments}}
                             for call in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


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
        # Tools go through: the server says (400) whether its model can call them.
        self.info = ModelInfo(name=model or self._first_model(), max_sequence_length=context_length,
                              supports_system_prompt=True, supports_tools=True)
        self._streams: dict[str, RemoteStream] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._unreachable: Optional[str] = None  # what the last health probe found
        self._probed_at = float("-inf")
        self._probing = False

    def _first_model(self) -> str:
        try:
            response = self.client.get("/models")
            response.raise_for_status()
            return response.json()["data"][0]["id"]
        except Exception as error:
            raise ConnectionError(f"cannot list the models of {self.base_url} ({error}); check --api-base "
                                  "(it usually ends in /v1) and --api-key, or name the model with --model") from None

    def submit(self, request: ChatRequest) -> RemoteStream:
        if self._closed:
            raise EngineBusy("the server is shutting down")
        request.sampling.validate()
        if not request.messages or request.messages[-1].role not in ("user", "tool"):
            raise InvalidRequest("the conversation must end with a user message or a tool result")
        stream = RemoteStream(self, request)
        with self._lock:
            self._streams = {rid: s for rid, s in self._streams.items() if s.alive}
            self._streams[request.request_id] = stream
        return stream

    def cancel(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.cancel()

    def stats(self) -> dict:
        with self._lock:
            return {"active_sequences": sum(s.alive for s in self._streams.values())}

    def health(self) -> Optional[str]:
        """None while the server answered its last probe; probes run in the background, at most
        every HEALTH_PROBE_S, so this never waits on the network."""
        if self._closed:
            return "the server is shutting down"
        with self._lock:
            due = time.monotonic() - self._probed_at >= HEALTH_PROBE_S and not self._probing
            if due:
                self._probing, self._probed_at = True, time.monotonic()
        if due:
            threading.Thread(target=self._probe, daemon=True, name="remote-health").start()
        return self._unreachable

    def _probe(self) -> None:
        try:
            self.client.get("/models", timeout=5.0).raise_for_status()
            self._unreachable = None
        except Exception as error:
            self._unreachable = f"the model server at {self.base_url} does not answer ({type(error).__name__})"
        finally:
            self._probing = False

    def close(self, drain_s: float = 0.0) -> None:
        """Refuse new requests, let running answers finish for up to drain_s seconds, then cut
        the rest off ("error"). Idempotent."""
        self._closed = True
        deadline = time.monotonic() + max(0.0, drain_s)
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.join(timeout=max(0.0, deadline - time.monotonic()))
        for stream in streams:
            stream.cut(SHUTDOWN_MESSAGE)
        for stream in streams:
            stream.join(timeout=5.0)
        self.client.close()
