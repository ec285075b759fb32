"""One chat turn between a web page (or API client) and a ChatBackend, with no Gradio in it.

The page keeps the conversation itself (in the browser's storage), so the server holds nothing
per user between turns; `clean_history` checks what a browser sends back. While an answer runs,
`ActiveStreams` knows which backend streams belong to which browser session, so that Stop, a
closed tab or Reset can cancel them in the model at once rather than only hiding the text.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional

from model_runtime.protocol import ChatBackend, ChatRequest, ChatStream, Message, SamplingParams

from .i18n import say

MAX_MESSAGE_CHARS = 16_000  # far beyond a 2048-token context; bounds rendering work per message
MAX_HISTORY_CHARS = 200_000  # what a browser may send back; the model sees far less anyway
UPDATE_INTERVAL_S = 0.05  # at most this often a streamed update goes to the page (the last always does)


def clean_history(value: Any) -> list[dict]:
    """A stored or API-sent conversation as alternating user/assistant messages; junk is dropped.

    Accepts messages ({"role", "content"}, as the page stores them) or [user, answer] pairs (as
    the original ChatGLM API takes them)."""
    messages: list[dict] = []
    if not isinstance(value, list):
        return messages
    for item in value:
        if isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
            messages += [{"role": "user", "content": item[0]}, {"role": "assistant", "content": item[1]}]
        elif isinstance(item, dict) and item.get("role") in ("user", "assistant") and isinstance(item.get("content"), str):
            messages.append({"role": item["role"], "content": item["content"]})
    turns: list[dict] = []
    for message in messages:  # keep strict user, assistant alternation
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if message["role"] == expected and len(message["content"]) <= MAX_MESSAGE_CHARS:
            turns.append(message)
    if len(turns) % 2:
        turns.pop()
    while turns and sum(len(m["content"]) for m in turns) > MAX_HISTORY_CHARS:
        del turns[:2]
    return turns


def check_message(message: Any, lang: str = "en") -> str:
    """The user's new message, or ValueError (empty, too long) with a message for people."""
    if not isinstance(message, str) or not message.strip():
        raise ValueError(say(lang, "empty"))
    if len(message) > MAX_MESSAGE_CHARS:
        raise ValueError(say(lang, "too_long", length=len(message), limit=MAX_MESSAGE_CHARS))
    return message


def check_settings(max_length: Any, top_p: Any, temperature: Any, limit: int, lang: str = "en",
                   defaults: SamplingParams = SamplingParams()) -> SamplingParams:
    """Sampling parameters from the page or an API call, or ValueError with a message for people.
    What the page does not set (top_k, repetition penalty) comes from the model's `defaults`."""
    def number(name, value, low, high, integer=False):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(say(lang, "number", name=name, value=value))
        if not low <= value <= high or (integer and value != int(value)):
            raise ValueError(say(lang, "range", name=name, low=low, high=high, value=value))
        return int(value) if integer else float(value)

    params = replace(defaults, max_length=number("max_length", max_length, 1, limit, integer=True),
                     top_p=number("top_p", top_p, 0.01, 1.0), temperature=number("temperature", temperature, 0.0, 2.0),
                     max_new_tokens=None, seed=None)
    params.validate()
    return params


class ActiveStreams:
    """The backend streams each browser session is running, so they can be cancelled from outside.

    A stop also counts per session, so that an answer whose stream did not exist yet when Stop
    came (pressed before the first token) is cancelled as soon as it is submitted."""

    def __init__(self):
        self._lock = threading.Lock()
        self._streams: dict[str, set] = {}
        self._stops: dict[str, int] = {}

    def begin(self, session: str) -> int:
        """Call when an answer starts; pass the result to `add`."""
        with self._lock:
            return self._stops.get(session, 0)

    def add(self, session: str, stream: ChatStream, started: int) -> None:
        with self._lock:
            self._streams.setdefault(session, set()).add(stream)
            stopped = self._stops.get(session, 0) != started
        if stopped:
            stream.cancel()

    def remove(self, session: str, stream: ChatStream) -> None:
        with self._lock:
            streams = self._streams.get(session)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self._streams[session]

    def stop(self, session: str) -> None:
        with self._lock:
            self._stops[session] = self._stops.get(session, 0) + 1
            streams = list(self._streams.get(session, ()))
        for stream in streams:
            stream.cancel()

    def forget(self, session: str) -> None:
        """The session ended (tab closed): cancel what it runs and drop its bookkeeping."""
        self.stop(session)
        with self._lock:
            self._stops.pop(session, None)

    def count(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._streams.values())


@dataclass(frozen=True)
class Progress:
    """The state of an answer as the page shows it."""

    text: str = ""
    finished: bool = False
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    queue_position: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dropped_turns: int = 0
    tokens_per_second: Optional[float] = None


def stream_answer(backend: ChatBackend, history: list[dict], query: str, params: SamplingParams,
                  active: ActiveStreams, session: str, started: int, system: str = "") -> Iterator[Progress]:
    """Submit one turn and follow it. Raises InvalidRequest / EngineBusy at once if refused.

    Whoever stops iterating early (a closed generator) cancels the request in the backend."""
    messages = (Message("system", system),) if system.strip() else ()
    messages += tuple(Message(m["role"], m["content"]) for m in history) + (Message("user", query),)
    stream = backend.submit(ChatRequest(messages=messages, sampling=params))
    active.add(session, stream, started)
    first_token_at: Optional[float] = None
    last_sent = 0.0
    finished = False
    try:
        for event in stream:
            now = time.monotonic()
            if event.completion_tokens and first_token_at is None:
                first_token_at = now
            speed = None
            if first_token_at is not None and event.completion_tokens > 1 and now > first_token_at:
                speed = (event.completion_tokens - 1) / (now - first_token_at)
            finished = event.finished
            if not finished and event.kind == "delta" and now - last_sent < UPDATE_INTERVAL_S:
                continue
            last_sent = now
            yield Progress(event.text, finished, event.finish_reason, event.error, event.queue_position,
                           event.prompt_tokens, event.completion_tokens, event.dropped_turns, speed)
    finally:
        if not finished:
            stream.cancel()
        active.remove(session, stream)


def readout(progress: Progress, max_length: int, lang: str) -> str:
    """The small status line under the chat: speed, context use, dropped turns, why it ended."""
    if progress.queue_position and not progress.completion_tokens:
        return say(lang, "queued", position=progress.queue_position)
    parts = []
    if progress.tokens_per_second is not None:
        parts.append(say(lang, "speed", speed=progress.tokens_per_second))
    if progress.prompt_tokens:
        parts.append(say(lang, "context", used=progress.prompt_tokens + progress.completion_tokens,
                         limit=max_length))
    if progress.dropped_turns:
        parts.append(say(lang, "dropped", count=progress.dropped_turns))
    if progress.finish_reason == "cancelled":
        parts.append(say(lang, "stopped"))
    elif progress.finish_reason == "length":
        parts.append(say(lang, "truncated"))
    elif progress.finish_reason == "error":
        parts.append(say(lang, "failed", error=progress.error or "?"))
    return " · ".join(parts)
