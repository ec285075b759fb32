"""The engine interface: the only thing the web demo and the API know about the model.

Plain data types and one Protocol, no torch, so that `webdemo` can import this module on a
machine without the model stack and so that a remote OpenAI-compatible server can stand behind
the same interface as the local engine.

A caller builds a `ChatRequest`, hands it to `ChatBackend.submit`, and iterates the returned
`ChatStream` for `ChatEvent`s until one has `finished` set. `ChatStream.cancel()` (or
`ChatBackend.cancel(request_id)`) ends a queued request at once and a running one at the next
decode step; the stream then ends with finish_reason "cancelled".

Endings are honest: "stop" only for a natural end (end-of-answer token or a stop string),
"length" only for a length limit, "cancelled" when the caller asked for it, and "error" (with a
message) for everything else that cuts an answer short: a failure, a deadline, a shutdown. A
cut-off answer never looks complete.

Nothing here blocks forever: iterating a stream ends with an "error" event if the backend stops
producing events (its scheduler died), and `health()` says so.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional, Protocol, Sequence

Role = Literal["system", "user", "assistant", "tool"]
# "tool_calls": the answer is a call of one of the request's tools (ChatEvent.tool_calls)
FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "error"]
EventKind = Literal["queued", "delta", "done"]

_request_counter = itertools.count(1)


class InvalidRequest(ValueError):
    """A request the engine refuses before doing any work (bad parameter, prompt too long...)."""


class EngineBusy(RuntimeError):
    """The waiting queue is full: the caller should try again later."""


@dataclass(frozen=True)
class ToolCall:
    """A function call the assistant wrote (ChatGLM3 / GLM-4). The client runs it, never the server."""

    id: str
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its OpenAI `function` object whole, as JSON text, because
    it goes into the prompt as the client wrote it (docs/tool-calling.md)."""

    name: str
    function_json: str


@dataclass(frozen=True)
class ToolChoice:
    """"auto": the model decides; "none": the tools stay out of the prompt; "function" (with
    `name`), or "required" with a single tool: the prompt makes the model write that call."""

    mode: Literal["auto", "none", "required", "function"] = "auto"
    name: Optional[str] = None


@dataclass(frozen=True)
class Message:
    """One message. An assistant message may carry the calls it made (`tool_calls`, its content
    then being text written before them, often empty); a "tool" message is a call's result."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: Optional[str] = None


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy; max_length counts prompt plus answer
    (the ChatGLM convention); max_new_tokens, when set, also bounds the answer alone."""

    max_length: int = 2048
    max_new_tokens: Optional[int] = None
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()

    def validate(self) -> None:
        """Raise InvalidRequest naming the first bad field."""
        def bad(name, value, rule):
            raise InvalidRequest(f"{name}={value!r} is out of range: {rule}")

        for name in ("max_length", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                bad(name, value, "must be an integer")
        if self.max_length < 1:
            bad("max_length", self.max_length, "must be >= 1")
        if self.max_new_tokens is not None and (
            isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        if self.top_k < 0:
            bad("top_k", self.top_k, "must be >= 0 (0 disables top-k)")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, value, "must be a finite number")
        if self.temperature < 0:
            bad("temperature", self.temperature, "must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "must be > 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", self.seed, "must be an integer")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", self.stop, "must be non-empty strings")


@dataclass(frozen=True)
class ChatRequest:
    """One answer to generate: the conversation so far, ending with the user's message."""

    messages: tuple[Message, ...]
    sampling: SamplingParams = SamplingParams()
    request_id: str = field(default_factory=lambda: f"req-{next(_request_counter)}")
    # Seconds from submission, time spent waiting in the queue included; then the stream ends with
    # finish_reason "error" and a message saying the time limit was reached.
    deadline_s: Optional[float] = None
    # KV-cache prefix reuse (ChatGLM2/3, GLM-4) happens only between requests with the same salt,
    # so that timing cannot tell one visitor what another one sent. None: no reuse at all.
    # Front ends derive it from something the client cannot choose for another client (their own
    # browser session, the hash of an API key), never from a raw client-sent value.
    cache_salt: Optional[str] = None
    # Functions the model may call (models with ModelInfo.supports_tools only) and how it may.
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    # Who asked, for per-client shares of the backend (a front end's own word for the client:
    # its address or credential, never a raw client-sent value). Backends themselves ignore it.
    client: Optional[str] = None


@dataclass(frozen=True)
class ChatEvent:
    """One step of a streamed answer.

    kind "queued": waiting; queue_position is 1 for the next request to start.
    kind "delta": `delta` is new text; `text` the whole answer so far (already post-processed).
        The first token always sends one, even with no text yet: it marks "generating now".
    kind "done": the last event; finish_reason says why, `error` holds a message on "error".
    """

    kind: EventKind
    request_id: str
    delta: str = ""
    text: str = ""
    queue_position: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dropped_turns: int = 0  # oldest history turns left out of the prompt to fit max_length
    finish_reason: Optional[FinishReason] = None
    error: Optional[str] = None
    tool_calls: tuple[ToolCall, ...] = ()  # on "done" with finish_reason "tool_calls"
    # Reasoning models (ModelInfo.reasoning): the thinking so far, apart from `text` (the visible
    # reply), and what this event added to it; a delta event may carry thinking only.
    reasoning: str = ""
    reasoning_delta: str = ""

    @property
    def finished(self) -> bool:
        return self.kind == "done"


TOOL_MODELS = "ChatGLM3-6B and GLM-4-9B-chat (and GLM-4-0414, GLM-Z1)"  # the models trained to call functions


@dataclass(frozen=True)
class ModelInfo:
    """What a front end needs to know to draw its controls."""

    name: str
    max_sequence_length: int
    supports_system_prompt: bool = False  # ChatGLM3 / GLM-4: show a "System prompt" box
    supports_tools: bool = False  # ChatGLM3 / GLM-4: ChatRequest.tools and tool messages are understood
    random_weights: bool = False  # a tiny test checkpoint: answers are noise
    # The model's reference settings (max_length, top_p, temperature, repetition_penalty), for
    # the controls' initial values: ChatGLM-6B 2048/0.7/0.95, ChatGLM2/3 8192/0.8/0.8, GLM-4
    # 8192/0.8/0.6 with repetition penalty 1.2.
    default_sampling: SamplingParams = SamplingParams()
    # What was loaded on top of the base weights, one line each (a LoRA adapter, a P-tuning v2
    # prefix), for the page and /v1/models to say which fine-tune answers.
    fine_tunes: tuple[str, ...] = ()
    # GLM-Z1: every answer starts with thinking (ChatEvent.reasoning), which the history sent back
    # leaves out.
    reasoning: bool = False


class ChatStream(Protocol):
    request_id: str

    def __iter__(self) -> Iterator[ChatEvent]: ...

    def cancel(self) -> None: ...


class ChatBackend(Protocol):
    """Submit chat requests, stream their events, cancel them. Thread-safe."""

    info: ModelInfo

    def submit(self, request: ChatRequest) -> ChatStream:
        """Validate and enqueue; raises InvalidRequest or EngineBusy at once, never later."""
        ...

    def cancel(self, request_id: str) -> None: ...

    def stats(self) -> dict: ...

    def health(self) -> Optional[str]:
        """None while requests are served; else why not, in a few words (the scheduler stopped,
        shutting down, the remote server is unreachable). Cheap and non-blocking."""
        ...

    def close(self, drain_s: float = 0.0) -> None:
        """Stop accepting requests (submit raises EngineBusy), let running answers finish for up
        to drain_s seconds, then end the rest with finish_reason "error" (cut off). Idempotent."""
        ...


def messages_from_pairs(history: Sequence[tuple[str, str]], query: str, system: Optional[str] = None) -> tuple[Message, ...]:
    """The seed's (query, response) history plus a new query, as role messages."""
    messages = [Message("system", system)] if system else []
    for user_text, answer in history:
        messages += [Message("user", user_text), Message("assistant", answer)]
    messages.append(Message("user", query))
    return tuple(messages)
