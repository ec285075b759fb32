"""OpenAI tool calling on /v1/chat/completions: reading `tools`, `tool_choice`, assistant
`tool_calls` and `role: "tool"` messages, and writing tool calls into answers and stream chunks.

Only the shapes are checked here (names, JSON arguments, sizes); the prompt layout and the
reading of the model's answer belong to the model's chat format (docs/tool-calling.md).
"""
from __future__ import annotations

import json
import re
from typing import Any

from model_runtime.protocol import TOOL_MODELS, Message, Tool, ToolCall, ToolChoice

from .limits import MAX_MESSAGE_CHARS

MAX_TOOLS = 64
MAX_TOOLS_CHARS = 64_000  # all function definitions together, as JSON text (they go into every prompt)
MAX_TOOL_CALLS = 16  # in one assistant message
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule; also keeps the metadata line one line
MAX_ID_CHARS = 256


class ToolRequestError(ValueError):
    """A tool field that is not acceptable; `param` names it (as OpenAI errors do)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _name(value: Any, param: str) -> str:
    if not isinstance(value, str) or not TOOL_NAME.fullmatch(value):
        raise ToolRequestError(f"'{param}' must be 1 to 64 letters, digits, '_' or '-'", param)
    return value


def parse_tools(raw: Any) -> tuple[Tool, ...]:
    """`tools` -> Tools; the function objects are kept whole (they go into the prompt as sent)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise ToolRequestError(f"'tools' must be a list of at most {MAX_TOOLS} tools", "tools")
    tools, names = [], set()
    for index, tool in enumerate(raw):
        param = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict) \
                or set(tool) - {"type", "function"}:
            raise ToolRequestError(f"'{param}' must be {{\"type\": \"function\", \"function\": {{...}}}}", param)
        function = tool["function"]
        name = _name(function.get("name"), f"{param}.function.name")
        if name in names:
            raise ToolRequestError(f"two tools are named {name!r}", f"{param}.function.name")
        names.add(name)
        if not isinstance(function.get("description", ""), str) or \
                not isinstance(function.get("parameters", {}), dict):
            raise ToolRequestError(f"'{param}.function' needs a string description and an object parameters", param)
        tools.append(Tool(name, json.dumps(function, ensure_ascii=False)))
    if sum(len(tool.function_json) for tool in tools) > MAX_TOOLS_CHARS:
        raise ToolRequestError(f"the tools' definitions are longer than {MAX_TOOLS_CHARS} characters", "tools")
    return tuple(tools)


def parse_tool_choice(raw: Any, tools: tuple[Tool, ...]) -> ToolChoice:
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    if raw in ("auto", "none", "required"):
        if raw != "none" and not tools:
            raise ToolRequestError(f"tool_choice {raw!r} needs 'tools'", "tool_choice")
        return ToolChoice(raw)
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("function"), dict):
        name = raw["function"].get("name")
        if name not in {tool.name for tool in tools}:
            raise ToolRequestError(f"tool_choice names a function that is not in 'tools': {str(name)[:64]!r}",
                                   "tool_choice")
        return ToolChoice("function", name)
    raise ToolRequestError("'tool_choice' must be \"none\", \"auto\", \"required\" or "
                           "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")


def _tool_calls(raw: Any, index: int) -> tuple[ToolCall, ...]:
    param = f"messages[{index}].tool_calls"
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_TOOL_CALLS:
        raise ToolRequestError(f"'{param}' must be a list of 1 to {MAX_TOOL_CALLS} calls", param)
    calls = []
    for call in raw:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function" \
                or not isinstance(call.get("id", ""), str) or len(call.get("id", "")) > MAX_ID_CHARS:
            raise ToolRequestError(f"'{param}' items must be {{\"id\", \"type\": \"function\", \"function\": "
                                   f"{{\"name\", \"arguments\"}}}}", param)
        name = _name(function.get("name"), f"{param}.function.name")
        arguments = function.get("arguments")
        try:
            valid = isinstance(arguments, str) and len(arguments) <= MAX_MESSAGE_CHARS and \
                isinstance(json.loads(arguments), dict)
        except (ValueError, RecursionError):  # the string's own nesting is not bounded by the body's
            valid = False
        if not valid:
            raise ToolRequestError(f"'{param}' arguments must be a JSON object, as a string", param)
        calls.append(ToolCall(call.get("id", ""), name, arguments))
    return tuple(calls)


def tool_message_fields(message: dict, index: int) -> dict:
    """The Message fields beyond role and content of an assistant or tool message."""
    if message["role"] == "assistant" and message.get("tool_calls") is not None:
        return {"tool_calls": _tool_calls(message["tool_calls"], index)}
    if message["role"] == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or len(call_id) > MAX_ID_CHARS:
            raise ToolRequestError(f"messages[{index}] (role tool) needs a string 'tool_call_id'",
                                   f"messages.[{index}].tool_call_id")
        return {"tool_call_id": call_id}
    return {}


def check_tools_supported(messages: list[Message], tools: tuple[Tool, ...], supports_tools: bool) -> None:
    """Models not trained to call functions are told so, with the names of those that are."""
    if not supports_tools and (tools or any(m.role == "tool" or m.tool_calls for m in messages)):
        raise ToolRequestError(f"this model cannot call tools: tool calling needs {TOOL_MODELS}", "tools")


def tool_calls_json(calls: tuple[ToolCall, ...]) -> list[dict]:
    return [{"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in calls]


def tool_call_deltas(calls: tuple[ToolCall, ...]) -> list[dict]:
    """Stream deltas for finished calls, as OpenAI sends them: id, type and name with empty
    arguments first, then the arguments."""
    deltas = []
    for index, call in enumerate(calls):
        deltas.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                       "function": {"name": call.name, "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})
    return deltas
