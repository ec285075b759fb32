"""One chat turn between a web page (or API client) and a ChatBackend, with no Gradio in it.

The page keeps the conversation itself (in the browser's storage), so the server holds nothing
per user between turns; `clean_history` checks what a browser sends back. While an answer runs,
`ActiveStreams` knows which backend streams belong to which browser session, so that Stop, a
closed tab or Reset can cancel them in the model at once rather than only hiding the text.
"""
from __future__ import annotations

import itertools
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional

from model_runtime.protocol import ChatBackend, ChatRequest, ChatStream, Message, SamplingParams, ToolCall

from .access import BadJSON, parse_json
from .api_tools import MAX_ID_CHARS, MAX_TOOL_CALLS, TOOL_NAME
from .i18n import say
from .limits import MAX_JSON_DEPTH, MAX_MESSAGE_CHARS, MAX_MESSAGES, Limits

UPDATE_INTERVAL_S = 0.05  # at most this often a streamed update goes to the page (the last always does)
MAX_REMEMBERED_STOPS = 4096  # sessions whose last Stop is remembered (see ActiveStreams)
TOOL_CALL_ID = re.compile(f"[A-Za-z0-9_.:-]{{1,{MAX_ID_CHARS}}}")  # OpenAI's "call_..." and others' ids


def read_tool_calls(value: Any) -> list[dict]:
    """An assistant message's `tool_calls` in OpenAI's shape, exactly: 1 to MAX_TOOL_CALLS
    {"id", "type": "function", "function": {"name", "arguments"}}, ids distinct and of a bounded
    safe alphabet, names as /v1 accepts them, arguments a JSON object as a string (its size and
    nesting bounded before parsing). ValueError says what is wrong. Nothing in it is ever run."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_TOOL_CALLS:
        raise ValueError(f"tool_calls must be a list of 1 to {MAX_TOOL_CALLS} calls")
    calls, ids = [], set()
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or set(call) != {"id", "type", "function"} or call["type"] != "function" \
                or set(function) != {"name", "arguments"}:
            raise ValueError('a tool call must be {"id", "type": "function", "function": {"name", "arguments"}}')
        call_id, name, arguments = call["id"], function["name"], function["arguments"]
        if not isinstance(call_id, str) or not TOOL_CALL_ID.fullmatch(call_id) or call_id in ids:
            raise ValueError(f"a tool call id must be 1 to {MAX_ID_CHARS} letters, digits or _.:- and distinct")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise ValueError("a tool name must be 1 to 64 letters, digits, '_' or '-'")
        if not isinstance(arguments, str) or len(arguments) > MAX_MESSAGE_CHARS:
            raise ValueError(f"tool arguments must be text of at most {MAX_MESSAGE_CHARS} characters")
        try:
            parsed = parse_json(arguments.encode("utf-8", "surrogatepass"), MAX_JSON_DEPTH)
        except BadJSON:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError("tool arguments must be a JSON object, as text")
        ids.add(call_id)
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return calls


def _read_message(item: Any) -> Optional[dict]:
    """One message of a stored or sent conversation in the page's shape, or None if it is junk:
    {"role": "user" | "assistant", "content"}, an assistant's {"content", "tool_calls"} (content
    null read as "") or {"content", "reasoning"}, or {"role": "tool", "tool_call_id", "content"}.
    Other keys are ignored."""
    if not isinstance(item, dict):
        return None
    role, content = item.get("role"), item.get("content")
    if role == "assistant" and item.get("tool_calls") is not None:
        try:
            calls = read_tool_calls(item["tool_calls"])
        except ValueError:
            return None
        return {"role": role, "content": content, "tool_calls": calls} if isinstance(content, str) else \
            {"role": role, "content": "", "tool_calls": calls} if content is None else None
    if not isinstance(content, str):
        return None
    if role == "tool":
        call_id = item.get("tool_call_id")
        return {"role": role, "tool_call_id": call_id, "content": content} \
            if isinstance(call_id, str) and TOOL_CALL_ID.fullmatch(call_id) else None
    if role == "assistant" and isinstance(item.get("reasoning"), str) and item["reasoning"]:
        return answer_message(content, item["reasoning"][:MAX_MESSAGE_CHARS])
    return {"role": role, "content": content} if role in ("user", "assistant") else None


def answer_message(text: str, reasoning: str = "") -> dict:
    """A stored answer; a reasoning model's thinking beside it ("reasoning": shown on the page,
    kept across reloads, never sent back to the model)."""
    return {"role": "assistant", "content": text, "reasoning": reasoning} if reasoning else \
        {"role": "assistant", "content": text}


def clean_history(value: Any, max_items: int = MAX_MESSAGES) -> list[dict]:
    """A stored or API-sent conversation as whole turns; junk is dropped.

    A turn is a user message, then any number of assistant tool calls each followed by all of
    its results (role "tool", in any order), then the answer (an assistant message without
    calls): the shape /v1 takes, and what an agent run exports. A call whose results are not all
    there is dropped with them; a message out of place is dropped. Accepts messages (as the page
    stores them) or [user, answer] pairs (as the original ChatGLM API takes them). Only the
    newest `max_items` items are read, in one pass: the value comes from the client, and older
    turns would not fit the limits anyway."""
    if not isinstance(value, list):
        return []
    kept: list[dict] = []
    turn: list[dict] = []  # the open turn: its user message, then calls with all their results
    call: Optional[dict] = None  # the open call, waiting for its results
    results: list[dict] = []
    waiting: set[str] = set()  # ids of the open call still without a result

    def add(message: dict) -> None:
        nonlocal turn, call, results, waiting
        if call is not None:
            if message["role"] == "tool" and message["tool_call_id"] in waiting:
                waiting.discard(message["tool_call_id"])
                results.append(message)
                if not waiting:
                    turn += [call, *results]
                    call = None
                return
            call = None  # its results are not all there: dropped with them
        if not turn:
            if message["role"] == "user":
                turn = [message]
        elif message["role"] == "assistant" and "tool_calls" in message:
            call, results, waiting = message, [], {c["id"] for c in message["tool_calls"]}
        elif message["role"] == "assistant":
            kept.extend(turn + [message])
            turn = []

    for item in value[-max_items:] if max_items > 0 else ():
        if isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
            add({"role": "user", "content": item[0]})
            add({"role": "assistant", "content": item[1]})
        else:
            message = _read_message(item)
            if message is not None:
                add(message)
    return kept


def message_text(message: dict) -> str:
    """What a stored message counts for the limits: its text and its calls' arguments (as /v1)."""
    return message["content"] + "".join(call["function"]["arguments"] for call in message.get("tool_calls", ()))


def fit_history(history: list[dict], fixed: list[str], limits: Limits) -> tuple[list[dict], int]:
    """The newest whole turns of `history` (see clean_history) that fit `limits` together with
    the `fixed` messages (system prompt, new query), and how many older turns were left out.
    Raises LimitExceeded if the fixed messages alone are over a limit. One backward pass."""
    limits.check_conversation(fixed)
    count, total = len(fixed), sum(len(text) for text in fixed)
    start = len(history)
    turn_count, turn_chars, turn_fits = 0, 0, True
    for index in range(len(history) - 1, -1, -1):
        size = len(message_text(history[index]))
        turn_count, turn_chars = turn_count + 1, turn_chars + size
        turn_fits = turn_fits and size <= limits.max_message_chars
        if history[index]["role"] != "user":
            continue
        if not turn_fits or count + turn_count > limits.max_messages \
                or total + turn_chars > limits.max_conversation_chars:
            break
        count, total, start = count + turn_count, total + turn_chars, index
        turn_count, turn_chars = 0, 0
    return history[start:], sum(message["role"] == "user" for message in history[:start])


def has_tool_messages(history: list[dict]) -> bool:
    return any(message["role"] == "tool" or "tool_calls" in message for message in history)


def to_messages(history: list[dict], supports_tools: bool) -> tuple[Message, ...]:
    """Stored messages for the backend: tool calls and results as they are for a model that
    understands them; for one that does not, each turn is its question and its answer."""
    messages = []
    for message in history:
        calls = tuple(ToolCall(call["id"], call["function"]["name"], call["function"]["arguments"])
                      for call in message.get("tool_calls", ()))
        if supports_tools:
            messages.append(Message(message["role"], message["content"], calls, message.get("tool_call_id")))
        elif message["role"] != "tool" and not calls:
            messages.append(Message(message["role"], message["content"]))
    return tuple(messages)


def check_message(message: Any, lang: str = "en", limit: int = MAX_MESSAGE_CHARS) -> str:
    """The user's new message, or ValueError (empty, too long) with a message for people."""
    if not isinstance(message, str) or not message.strip():
        raise ValueError(say(lang, "empty"))
    if len(message) > limit:
        raise ValueError(say(lang, "too_long", length=len(message), limit=limit))
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

    A Stop is also remembered per session, so that an answer whose stream did not exist yet when
    Stop came (pressed before the first token) is cancelled as soon as it is submitted. Session
    hashes come from clients, so what is remembered is bounded: a Stop is a number from one
    global sequence, and forgetting an old one can only let an answer run, never stop another."""

    def __init__(self, max_remembered_stops: int = MAX_REMEMBERED_STOPS):
        self._lock = threading.Lock()
        self._streams: dict[str, set] = {}
        self._last_stop: OrderedDict[str, tuple[int, int]] = OrderedDict()  # (stopped, abandoned)
        self._sequence = itertools.count(1)
        self._max_remembered_stops = max_remembered_stops

    def begin(self) -> int:
        """Call when an answer starts (before submitting it); pass the result to `add`."""
        with self._lock:
            return next(self._sequence)

    def add(self, session: str, stream: ChatStream, started: int) -> None:
        with self._lock:
            self._streams.setdefault(session, set()).add(stream)
        if self.stopped_after(session, started):
            stream.cancel()

    def remove(self, session: str, stream: ChatStream) -> None:
        with self._lock:
            streams = self._streams.get(session)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self._streams[session]

    def stopped_after(self, session: str, started: int) -> bool:
        """Whether `session` was stopped after an answer that began at `started` (see begin)."""
        with self._lock:
            return self._last_stop.get(session, (0, 0))[0] > started

    def abandoned_after(self, session: str, started: int) -> bool:
        """Whether `session` was stopped with abandon=True after `started`."""
        with self._lock:
            return self._last_stop.get(session, (0, 0))[1] > started

    def stop(self, session: str, abandon: bool = False) -> None:
        """Cancel the session's answers. abandon: the page has moved on (another conversation
        is open), so the stopped answers must not write to it any more."""
        with self._lock:
            sequence = next(self._sequence)
            abandoned = sequence if abandon else self._last_stop.get(session, (0, 0))[1]
            self._last_stop[session] = (sequence, abandoned)
            self._last_stop.move_to_end(session)
            while len(self._last_stop) > self._max_remembered_stops:
                self._last_stop.popitem(last=False)
            streams = list(self._streams.get(session, ()))
        for stream in streams:
            stream.cancel()

    def forget(self, session: str) -> None:
        """The session ended (tab closed): cancel what it runs and drop its bookkeeping."""
        self.stop(session)
        with self._lock:
            self._last_stop.pop(session, None)

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
    reasoning: str = ""  # a reasoning model's thinking so far


def stream_answer(backend: ChatBackend, history: list[dict], query: str, params: SamplingParams,
                  active: ActiveStreams, session: str, started: int, system: str = "", *,
                  deadline_s: Optional[float] = None, cache_salt: Optional[str] = None,
                  client: Optional[str] = None) -> Iterator[Progress]:
    """Submit one turn and follow it. Raises InvalidRequest / EngineBusy at once if refused.
    deadline_s, cache_salt and client go to the ChatRequest (see model_runtime.protocol).

    Whoever stops iterating early (a closed generator) cancels the request in the backend."""
    messages = (Message("system", system),) if system.strip() else ()
    messages += to_messages(history, backend.info.supports_tools) + (Message("user", query),)
    stream = backend.submit(ChatRequest(messages=messages, sampling=params, deadline_s=deadline_s,
                                        cache_salt=cache_salt, client=client))
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
                           event.prompt_tokens, event.completion_tokens, event.dropped_turns, speed,
                           event.reasoning)
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
        parts.append(failure(progress, lang))
    return " · ".join(parts)


def failure(progress: Progress, lang: str) -> str:
    """Why an answer ended with an error; one with some text says that it is incomplete."""
    return say(lang, "cut_off" if progress.text else "failed", error=progress.error or "?")
