"""Bounds on the work one request may ask for, shared by the page, its Gradio API and /v1.

Every number here is checked before any tokenizing or model work starts, so that one hostile
request costs little more than reading its bytes. The HTTP layer (access.py) enforces the body
size and JSON depth for every route; `check_conversation` the shape of a conversation, with the
same words on the page and in the API.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

MAX_BODY_BYTES = 1 << 20  # default of --max-body-bytes: any request body, any route
MAX_JSON_DEPTH = 64  # nesting of any JSON body; a chat request needs about 6
MAX_MESSAGES = 400  # messages in one conversation (system, user and assistant)
MAX_MESSAGE_CHARS = 16_000  # one message; far beyond what a 2048-token context holds
MAX_CONVERSATION_CHARS = 200_000  # all messages together; the model sees far less anyway
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
DEFAULT_REQUEST_TIMEOUT_S = 600.0  # default of --request-timeout: queued plus generating


class LimitExceeded(ValueError):
    """A request beyond one of the bounds above; the message names the bound and the value."""


@dataclass(frozen=True)
class Limits:
    """The limits one server enforces (the flags can change the body size and the time)."""

    max_body_bytes: int = MAX_BODY_BYTES
    max_json_depth: int = MAX_JSON_DEPTH
    max_messages: int = MAX_MESSAGES
    max_message_chars: int = MAX_MESSAGE_CHARS
    max_conversation_chars: int = MAX_CONVERSATION_CHARS
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    def check_conversation(self, contents: Sequence[str]) -> None:
        """Raise LimitExceeded if the messages' texts (all of them, in order) are too many or
        too long. Cost: one pass over lengths, no tokenizing."""
        if len(contents) > self.max_messages:
            raise LimitExceeded(f"the conversation has {len(contents)} messages; at most {self.max_messages} "
                                f"are accepted: start a new conversation or send fewer turns")
        total = 0
        for index, text in enumerate(contents):
            if len(text) > self.max_message_chars:
                raise LimitExceeded(f"message {index} is {len(text)} characters long; at most "
                                    f"{self.max_message_chars} are accepted")
            total += len(text)
        if total > self.max_conversation_chars:
            raise LimitExceeded(f"the conversation is {total} characters long; at most "
                                f"{self.max_conversation_chars} are accepted: send fewer turns")
