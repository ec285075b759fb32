"""Reading a conversation back from the page's JSON download (render.conversation_json).

The file comes from anyone: its size is checked before a byte is read and only that many bytes
are read; its JSON depth is measured before parsing (access.parse_json); it must have the
export's shape exactly (user/assistant turns, strings only, within the page's limits). The text
is then handled like any message typed into the page: stored as it is and escaped when shown.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .access import BadJSON, parse_json
from .limits import LimitExceeded, Limits

MAX_IMPORT_BYTES = 256 << 10
MAX_IMPORT_DEPTH = 8  # {"messages": [{"content": ...}]} is 3 deep
EXPORT_KEYS = {"model", "exported_at", "messages"}


class ImportRefused(ValueError):
    """The file is not a conversation this page exported, or is too big; says why."""


def read_export(path: str | Path, limits: Limits, max_bytes: int = MAX_IMPORT_BYTES) -> list[dict]:
    """The messages of an exported conversation (alternating user/assistant, ending with an
    answer), or ImportRefused. path: a file the server's upload route wrote."""
    with open(path, "rb") as file:
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImportRefused(f"the file is larger than {max_bytes // 1024} KiB")
    try:
        value = parse_json(data, MAX_IMPORT_DEPTH)
    except BadJSON as error:
        raise ImportRefused(str(error).replace("request body", "file")) from None
    return check_export(value, limits)


def check_export(value: Any, limits: Limits) -> list[dict]:
    """The export's messages if `value` has its shape, else ImportRefused."""
    if not isinstance(value, dict) or not isinstance(value.get("messages"), list) or set(value) - EXPORT_KEYS:
        raise ImportRefused('it is not a conversation exported by this page ({"model", "exported_at", "messages"})')
    if not all(isinstance(value.get(key, ""), str) for key in ("model", "exported_at")):
        raise ImportRefused('"model" and "exported_at" must be text')
    messages = value["messages"]
    if not messages:
        raise ImportRefused("it holds no messages")
    if len(messages) > limits.max_messages:  # refused before looking at each one
        raise ImportRefused(f"it has {len(messages)} messages; at most {limits.max_messages} are accepted")
    turns = []
    for index, message in enumerate(messages):
        role = "user" if index % 2 == 0 else "assistant"
        if not isinstance(message, dict) or set(message) != {"role", "content"} or message["role"] != role \
                or not isinstance(message["content"], str):
            raise ImportRefused(f'message {index} must be {{"role": "{role}", "content": text}}')
        turns.append({"role": role, "content": message["content"].replace("\x00", "")})
    if len(turns) % 2:
        raise ImportRefused("the last message must be an answer")
    try:
        limits.check_conversation([turn["content"] for turn in turns])
    except LimitExceeded as error:
        raise ImportRefused(str(error)) from None
    return turns
