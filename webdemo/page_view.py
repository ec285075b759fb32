"""What the chat window shows of a stored conversation, and how a Chatbot event's index maps
back to the stored messages. No Gradio in it: events are read as the plain objects they carry.

The window shows more messages than are stored (a reasoning model's thinking, each tool call
and result), so every shown message remembers the stored one it comes from (`rows`).
"""
from __future__ import annotations

from typing import Any, Optional

from .i18n import say
from .render import chat_message, thinking_message, tool_arguments_text, tool_message


def heading(model_name: str) -> str:
    """The page title the family's own demos use, from the model's name."""
    name = model_name.lower()
    for prefix, heading in (("chatglm-6b", "ChatGLM-6B"), ("chatglm2-6b", "ChatGLM2-6B"),
                            ("chatglm3-6b", "ChatGLM3-6B"), ("glm-4-9b", "GLM-4-9B")):
        if name.startswith(prefix):
            return heading
    return model_name


def display(history: list[dict], lang: str, pending: bool = False) -> list[dict]:
    """Chat-window messages (see _rows)."""
    return [shown for _, shown in rows(history, lang, pending)]


def rows(history: list[dict], lang: str, pending: bool = False) -> list[tuple[int, dict]]:
    """Chat-window messages, each with the index of the stored message it shows. An empty answer
    shows as an ellipsis while it runs (pending), else as a note that there was none (stopped
    before its first word). A tool call message shows its text, if any, then each call, and a
    tool result shows as one message: collapsed, titled with the tool's name. Shown only: the
    page runs no tool. A reasoning model's thinking shows above its answer, collapsed and titled
    (running until the answer's first word)."""
    rows = []
    names: dict[str, str] = {}  # call id -> tool name, for the results
    for number, message in enumerate(history):
        calls = message.get("tool_calls", ())
        if message.get("reasoning"):
            running = pending and number == len(history) - 1 and not message["content"]
            rows.append((number, thinking_message(say(lang, "thinking_running" if running else "thinking"),
                                                  message["reasoning"])))
        if message["role"] == "tool":
            name = names.get(message["tool_call_id"], "?")
            rows.append((number, tool_message(say(lang, "tool_result", name=name), message["content"])))
        elif message["role"] == "assistant" and not message["content"] and not calls:
            running = pending and number == len(history) - 1
            note = "…" if running else ("_（没有回答）_" if lang == "zh" else "_(no answer)_")
            rows.append((number, {"role": "assistant", "content": {"type": "text", "text": note}}))
        elif message["content"]:
            rows.append((number, chat_message(message["role"], message["content"])))
        for call in calls:
            name = names[call["id"]] = call["function"]["name"]
            rows.append((number, tool_message(say(lang, "tool_called", name=name),
                                              tool_arguments_text(call["function"]["arguments"]), "json")))
    return rows


def event_index(event: Any) -> Optional[int]:
    """The message index a Chatbot event names, if it is a plain integer (the client sends it)."""
    data = getattr(event, "_data", None)
    index = data.get("index") if isinstance(data, dict) else None
    return index if isinstance(index, int) and not isinstance(index, bool) else None


def event_text(event: Any) -> Optional[str]:
    """The new text of an edit event, if it is text."""
    data = getattr(event, "_data", None)
    value = data.get("value") if isinstance(data, dict) else None
    if isinstance(value, dict):
        value = value.get("text")
    return value if isinstance(value, str) else None


def stored_index(messages: list[dict], shown_index: Optional[int]) -> Optional[int]:
    """The index of the stored message that the chat-window message at `shown_index` (a Chatbot
    event's index) shows, or None."""
    shown = rows(messages, "en")
    return shown[shown_index][0] if shown_index is not None and 0 <= shown_index < len(shown) else None


def user_message_at(messages: list[dict], shown_index: Optional[int]) -> Optional[int]:
    """The stored index of the user message that starts the turn holding the chat-window
    message at `shown_index`, or None."""
    index = stored_index(messages, shown_index)
    while index is not None and messages[index]["role"] != "user":  # stored chats are whole turns
        index -= 1
    return index
