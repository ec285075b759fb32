"""Reading a conversation back from the page's JSON download (render.conversation_json).

The file never touches the server's disk: the browser reads it and sends its bytes, base64-
encoded, in the import event (ui.py's PICK_IMPORT_JS; the server takes no uploads). They come
from anyone: the text's length is checked before it is decoded; the JSON depth is measured before parsing (access.parse_json); it must have the
export's shape exactly (whole turns as clean_history reads them: user messages, answers, tool
calls in OpenAI's shape with all their results; strings only; within the page's limits). The
text is then handled like any message typed into the page: stored as it is and escaped when
shown. Tool calls are only shown and sent back to the model: nothing in a file is ever run.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any

from .access import BadJSON, parse_json
from .conversation import TOOL_CALL_ID, clean_history, message_text, read_tool_calls
from .limits import LimitExceeded, Limits

MAX_IMPORT_BYTES = 256 << 10
MAX_IMPORT_DEPTH = 8  # {"messages": [{"tool_calls": [{"function": {"name": ...}}]}]} is 5 deep
EXPORT_KEYS = {"model", "exported_at", "messages"}
SHAPES = ('{"role": "user" or "assistant", "content": text}, {"role": "assistant", "content": text or null, '
          '"tool_calls": [...]} or {"role": "tool", "tool_call_id": id, "content": text}')
ORDER = "each turn is a user message, then tool calls each followed by all of its results, then an answer"


class ImportRefused(ValueError):
    """The file is not a conversation this page exported, or is too big; says why."""


def decode_upload(encoded: str, max_bytes: int = MAX_IMPORT_BYTES) -> bytes:
    """The file's bytes from the base64 text the page sends, or ImportRefused (too big: judged by
    the text's length, before decoding; not base64)."""
    if len(encoded) > 4 * (max_bytes // 3 + 1):
        raise ImportRefused(f"the file is larger than {max_bytes // 1024} KiB")
    try:
        data = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ImportRefused("the page sent the file in a form it cannot read (not base64)") from None
    if len(data) > max_bytes:
        raise ImportRefused(f"the file is larger than {max_bytes // 1024} KiB")
    return data


def read_export(data: bytes, limits: Limits) -> list[dict]:
    """The messages of an exported conversation (whole turns, ending with an answer), or
    ImportRefused."""
    try:
        value = parse_json(data, MAX_IMPORT_DEPTH)
    except BadJSON as error:
        raise ImportRefused(str(error).replace("request body", "file")) from None
    return check_export(value, limits)


def check_export(value: Any, limits: Limits) -> list[dict]:
    """The export's messages if `value` has its shape, else ImportRefused."""
    if not isinstance(value, dict) or not isinstance(value.get("messages"), list) or set(value) - EXPORT_KEYS:
        raise ImportRefused('it is not a conversation exported by this page (a JSON object with "messages", '
                            'and optionally "model" and "exported_at")')
    if not all(isinstance(value.get(key, ""), str) for key in ("model", "exported_at")):
        raise ImportRefused('"model" and "exported_at" must be text')
    messages = value["messages"]
    if not messages:
        raise ImportRefused("it holds no messages")
    if len(messages) > limits.max_messages:  # refused before looking at each one
        raise ImportRefused(f"it has {len(messages)} messages; at most {limits.max_messages} are accepted")
    turns = [_checked_message(message, index) for index, message in enumerate(messages)]
    if turns[-1]["role"] != "assistant" or "tool_calls" in turns[-1]:
        raise ImportRefused("the last message must be an answer")
    kept = clean_history(turns, len(turns))
    if kept != turns:  # out of order: the first message that is not where clean_history keeps it
        index = next((i for i, (a, b) in enumerate(zip(kept, turns)) if a != b), len(kept))
        raise ImportRefused(f"message {index} is out of place: {ORDER}")
    try:
        limits.check_conversation([message_text(turn) for turn in turns])
    except LimitExceeded as error:
        raise ImportRefused(str(error)) from None
    return turns


def _checked_message(message: Any, index: int) -> dict:
    """One message in exactly one of the export's shapes (NULs dropped from text), or ImportRefused."""
    role = message.get("role") if isinstance(message, dict) else None
    keys = set(message) if isinstance(message, dict) else set()
    calls = keys == {"role", "content", "tool_calls"} and role == "assistant"
    if not (keys == {"role", "content"} and role in ("user", "assistant") and isinstance(message["content"], str)
            or calls and (message["content"] is None or isinstance(message["content"], str))
            or keys == {"role", "tool_call_id", "content"} and role == "tool" and isinstance(message["content"], str)
            and isinstance(message["tool_call_id"], str) and TOOL_CALL_ID.fullmatch(message["tool_call_id"])):
        raise ImportRefused(f"message {index} must be {SHAPES}")
    checked = {"role": role, "content": (message["content"] or "").replace("\x00", "")}
    if calls:
        try:
            checked["tool_calls"] = read_tool_calls(message["tool_calls"])
        except ValueError as error:
            raise ImportRefused(f"message {index}: {error}") from None
    if role == "tool":
        checked = {"role": role, "tool_call_id": message["tool_call_id"], "content": checked["content"]}
    return checked
