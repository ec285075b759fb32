"""How ChatGLM3-6B and GLM-4-9B-chat write function calls, both ways: the tool definitions and
the calls in the prompt, and the safe reading of a call the model wrote (docs/tool-calling.md
has the layouts and their sources).

Model output is hostile: a call is read, never run. ChatGLM3's `tool_call(...)` is parsed
(`ast.parse`, which executes nothing) and its syntax tree walked, accepting only keyword
arguments with literal values; GLM-4's arguments are one JSON object. Whatever does not read
cleanly is not a call: the caller shows it as plain text.
"""
from __future__ import annotations

import ast
import json
import math
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..protocol import ToolCall

MAX_CALL_CHARS = 64_000  # longer answers are not read as calls (the parse stays cheap)
MAX_LITERAL_DEPTH = 32  # nesting of lists/dicts in one argument value

CHATGLM3_TOOL_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
GLM4_TOOL_SYSTEM = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
GLM4_TOOL_SUFFIX = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
CHATGLM3_FENCE_OPEN, CHATGLM3_FENCE_CLOSE = "```python\n", "\n```"


class NotACall(ValueError):
    """The text is not a well-formed call (the reason is for tests and logs, not for clients)."""


def _reject_constant(name: str):
    raise NotACall(f"{name} is not a JSON number")


def json_object(text: str) -> dict:
    """One JSON object (no NaN/Infinity); NotACall otherwise."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise NotACall(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise NotACall("the arguments are not a JSON object")
    return value


def literal(node: ast.AST, depth: int = 0) -> Any:
    """The value of a literal expression node, as JSON-compatible data; NotACall for anything
    else (names, calls, operators, attribute access, comprehensions...)."""
    if depth > MAX_LITERAL_DEPTH:
        raise NotACall("argument nested too deeply")
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (str, bool, int)):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise NotACall(f"unsupported constant {type(value).__name__}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) \
            and isinstance(node.operand, ast.Constant) and not isinstance(node.operand.value, bool) \
            and isinstance(node.operand.value, (int, float)):
        value = literal(node.operand, depth + 1)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [literal(item, depth + 1) for item in node.elts]
    if isinstance(node, ast.Dict):
        result = {}
        for key, value in zip(node.keys, node.values):
            if key is None or not isinstance(key, ast.Constant) or not isinstance(key.value, str):
                raise NotACall("dict keys must be strings")
            result[key.value] = literal(value, depth + 1)
        return result
    raise NotACall(f"{type(node).__name__} is not a literal")


def tool_call_arguments(code: str) -> dict:
    """The keyword arguments of `tool_call(k=v, ...)`, read without running anything."""
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise NotACall(f"not Python: {error}") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise NotACall("not a tool_call(...) expression")
    if call.args:
        raise NotACall("positional arguments")
    arguments = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise NotACall("**kwargs")
        if keyword.arg in arguments:
            raise NotACall(f"argument {keyword.arg} given twice")
        arguments[keyword.arg] = literal(keyword.value)
    return arguments


class ToolDialect:
    """One family's way of writing tools and calls (see the two below)."""

    def system_messages(self, functions: Sequence[dict], system: Optional[str]) -> list[tuple[str, str]]:
        """(role, content) messages that declare the tools, with the client's system text."""
        raise NotImplementedError

    def call_content(self, arguments: str) -> str:
        """The content of the assistant message that makes a call (its metadata is the name)."""
        raise NotImplementedError

    def read_arguments(self, content: str) -> dict:
        raise NotImplementedError

    def parse(self, answer: str, tool_names: Sequence[str]) -> Optional[ToolCall]:
        """The call in an answer "NAME\\n<arguments>" (metadata line, then content), or None
        when the answer is not exactly one well-formed call of one of tool_names."""
        if len(answer) > MAX_CALL_CHARS or "\n" not in answer:
            return None
        name, content = answer.split("\n", 1)
        name = name.strip()
        if name not in tool_names:
            return None
        try:
            arguments = self.read_arguments(content)
        except NotACall:
            return None
        return ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, json.dumps(arguments, ensure_ascii=False))


class ChatGLM3Tools(ToolDialect):
    """The tools as a JSON list after the system text; a call is a fenced `tool_call(k=v, ...)`."""

    def system_messages(self, functions, system):
        tools = json.dumps(list(functions), indent=4, ensure_ascii=False)
        return [("system", f"{system or CHATGLM3_TOOL_SYSTEM}\n{tools}")]

    def call_content(self, arguments: str) -> str:
        values = json_object(arguments)
        bad = [key for key in values if not key.isidentifier()]
        if bad:
            raise NotACall(f"argument name {bad[0]!r} is not a Python identifier")
        # Python literals, as ChatGLM3's training data writes them (format_function_call unparses
        # ast.Constant values, which is repr)
        call = ", ".join(f"{key}={value!r}" for key, value in values.items())
        return f"{CHATGLM3_FENCE_OPEN}tool_call({call}){CHATGLM3_FENCE_CLOSE}"

    def read_arguments(self, content: str) -> dict:
        content = content.strip()
        if not (content.startswith(CHATGLM3_FENCE_OPEN) and content.endswith(CHATGLM3_FENCE_CLOSE)):
            raise NotACall("not a ```python fenced block")
        return tool_call_arguments(content[len(CHATGLM3_FENCE_OPEN):-len(CHATGLM3_FENCE_CLOSE)])


class GLM4Tools(ToolDialect):
    """The tools as "## NAME" sections of a fixed system text; a call's arguments are JSON."""

    def system_messages(self, functions, system):
        declared = "".join(f"\n\n## {function['name']}\n\n{json.dumps(function, ensure_ascii=False, indent=4)}"
                           f"{GLM4_TOOL_SUFFIX}" for function in functions)
        messages = [("system", GLM4_TOOL_SYSTEM + declared)]
        return messages + [("system", system)] if system else messages

    def call_content(self, arguments: str) -> str:
        json_object(arguments)  # refused here when it is not an object
        return arguments

    def read_arguments(self, content: str) -> dict:
        return json_object(content.strip())


CHATGLM3_TOOLS = ChatGLM3Tools()
GLM4_TOOLS = GLM4Tools()


@dataclass(frozen=True)
class ToolReader:
    """Reads a call out of one answer: the request's tool names, and the function the prompt
    already named (`forced`: the answer then holds only the arguments)."""

    dialect: ToolDialect
    names: tuple[str, ...]
    forced: Optional[str] = None

    def read(self, answer: str) -> Optional[ToolCall]:
        return self.dialect.parse(f"{self.forced}\n{answer}" if self.forced else answer, self.names)
