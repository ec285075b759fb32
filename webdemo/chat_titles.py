"""A short title for a new conversation, asked of the model beside its first answer.

The request starts with the answer (the engine batches the two) from the first message alone,
so the title costs the user no waiting; the page applies it when it is ready, or drops it a
moment after the answer ends. A title the user gave always wins (library.Chat.shown_title).
No Gradio in it.
"""
from __future__ import annotations

import re
import threading
from typing import Optional

from model_runtime.protocol import ChatBackend, ChatRequest, EngineBusy, InvalidRequest, Message, SamplingParams

from .library import MAX_TITLE_CHARS, one_line

TITLE_PROMPT = ("Write a title of at most six words for a conversation that starts with the message below, "
                "in the message's language. Reply with the title only.\n\nMessage:\n{message}")
MESSAGE_CHARS = 500  # of the first message, for the prompt
TITLE_TOKENS = 24
_DECORATION = re.compile(r"^\s*(?:title|标题)\s*[:：]\s*|^[\s\"'“”‘’《》「」#*]+|[\s\"'“”‘’《》「」#*.。]+$", re.I)


def clean_title(text: str) -> str:
    """The model's reply as a title: its first non-empty line, without quotes, a "Title:" label
    or Markdown marks, on one line and cut to MAX_TITLE_CHARS ("" when nothing is left)."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    return one_line(_DECORATION.sub("", _DECORATION.sub("", line)), MAX_TITLE_CHARS)


class TitleJob:
    """One title request, followed in a thread of its own."""

    def __init__(self, backend: ChatBackend, message: str, *, cache_salt: Optional[str] = None,
                 client: Optional[str] = None, deadline_s: Optional[float] = None):
        self._title: Optional[str] = None
        self._done = threading.Event()
        sampling = SamplingParams(max_length=backend.info.max_sequence_length, max_new_tokens=TITLE_TOKENS,
                                  temperature=0.0)
        prompt = TITLE_PROMPT.format(message=message[:MESSAGE_CHARS])
        try:
            self._stream = backend.submit(ChatRequest(messages=(Message("user", prompt),), sampling=sampling,
                                                      deadline_s=deadline_s, cache_salt=cache_salt, client=client))
        except (InvalidRequest, EngineBusy):  # no title then: the chat keeps its first message as one
            self._stream = None
            self._done.set()
            return
        threading.Thread(target=self._follow, name="chat-title", daemon=True).start()

    def _follow(self) -> None:
        text, ended = "", False
        try:
            for event in self._stream:
                text, ended = event.text, event.finished and event.finish_reason in ("stop", "length")
        finally:
            self._title = clean_title(text) if ended else None
            self._done.set()

    def title(self, wait_s: float = 0.0) -> Optional[str]:
        """The title once ready ("" or None: there is none), waiting up to wait_s seconds."""
        self._done.wait(wait_s)
        return self._title if self._done.is_set() else None

    def ready(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        if self._stream is not None and not self._done.is_set():
            self._stream.cancel()
