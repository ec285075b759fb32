"""Which turns of a conversation go into the prompt, encoded in the tokenizer's chat format.

History rule: the prompt always holds the new query and as many of the most recent turns as fit
in `max_length` while leaving room for at least `answer_reserve(max_length)` answer tokens. The
oldest turns are left out first; `PromptPlan.dropped_turns` says how many. A query that does not
fit even alone is refused with InvalidRequest. Planning costs about what encoding the turns that
fit costs, however long the history is (see `plan_prompt`).

Conversations with tools (ChatGLM3, GLM-4: tool definitions, calls, results) are planned by
`plan_tool_conversation`: a turn is a user message and all that follows it up to the next one,
so a call is never kept without its result or the question that led to it. Checkpoints with a
chat template (GLM-4-0414, GLM-Z1) render whole conversations with it, tools or not
(`plan_template_conversation`), keeping the newest turns that fit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence as Seq

from ..protocol import TOOL_MODELS, InvalidRequest, Message, Tool, ToolChoice
from .formats import History, chat_format_for, with_system_in_first_query
from .template import template_messages
from .tool_calls import ToolReader


def answer_reserve(max_length: int) -> int:
    """Answer tokens the history budget keeps free: a quarter of max_length, at most 256."""
    return max(1, min(256, max_length // 4))


@dataclass(frozen=True)
class PromptPlan:
    tokens: list[int]
    dropped_turns: int
    stop_ids: frozenset = frozenset()  # the chat format's stop tokens (besides config.json's eos)
    tool_reader: Optional[ToolReader] = None  # set when the answer may be a call of the request's tools


def plan_prompt(tokenizer, query: str, history: Seq[tuple[str, str]], max_length: int,
                system: Optional[str] = None) -> PromptPlan:
    """Encode query plus the newest history turns that fit (see the module's history rule), in
    the tokenizer's chat format; a system prompt (ChatGLM3/GLM-4) is always kept.

    The prompt of the k newest turns grows with k, so the largest k that fits is searched for
    rather than tried one by one from the oldest: each turn is encoded once on its own to
    estimate k, then a few whole prompts around the estimate settle it exactly (a format's
    tokens across turn boundaries, and ChatGLM's round numbers, make the estimate inexact).
    Only the newest turns, up to about what fits, are ever encoded."""
    if not isinstance(query, str):
        raise InvalidRequest(f"the query must be a string, got {type(query).__name__}")
    budget = max_length - answer_reserve(max_length)
    chat_format = chat_format_for(tokenizer)
    history = list(history)
    prompts: dict[int, list[int]] = {}

    def prompt_keeping(kept: int) -> list[int]:
        if kept not in prompts:
            prompts[kept] = chat_format.encode(tokenizer, query, history[len(history) - kept:], system)
        return prompts[kept]

    def fits(kept: int) -> bool:
        return len(prompt_keeping(kept)) <= budget

    if not fits(0):
        raise InvalidRequest(
            f"the message is {len(prompt_keeping(0))} tokens long, but with maximum length {max_length} a "
            f"prompt may hold at most {budget}: shorten the message or raise the maximum length")
    kept = _estimate_turns_that_fit(tokenizer, chat_format, history, budget - len(prompt_keeping(0)))
    kept = _most_that_fit(fits, kept, len(history))
    return PromptPlan(prompt_keeping(kept), len(history) - kept, chat_format.stop_ids(tokenizer))


def _estimate_turns_that_fit(tokenizer, chat_format, history: list[tuple[str, str]], room: int) -> int:
    """How many of the newest turns fit in `room` tokens, each turn counted on its own."""
    empty = len(chat_format.encode(tokenizer, "", []))
    used = 0
    for kept, turn in enumerate(reversed(history)):
        used += len(chat_format.encode(tokenizer, "", [turn])) - empty
        if used > room:
            return kept
    return len(history)


def _most_that_fit(fits, guess: int, most: int) -> int:
    """The largest k in [0, most] with fits(k), for fits true at 0 and true up to some k only:
    gallop from the guess until the answer is bracketed, then bisect."""
    guess = max(0, min(guess, most))
    step = 1
    if fits(guess):
        low, high = guess, None  # fits(low); not fits(high)
        while low < most:
            probe = min(most, low + step)
            if not fits(probe):
                high = probe
                break
            low, step = probe, 2 * step
        if high is None:
            return most
    else:
        high = guess
        while True:
            probe = max(0, high - step)
            if fits(probe):
                low = probe
                break
            high, step = probe, 2 * step
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def pairs_from_messages(messages: Seq[Message]) -> tuple[str, History]:
    """Role messages (user/assistant alternating, ending with user) -> query and history pairs.
    ChatGLM-6B has no system role, so a system message is put in front of the first query."""
    system = "\n".join(m.content for m in messages if m.role == "system")
    turns = [m for m in messages if m.role != "system"]
    if not turns or turns[-1].role != "user":
        raise InvalidRequest("the conversation must end with a user message")
    history, pending = [], None
    for message in turns[:-1]:
        if message.role == "user":
            if pending is not None:
                history.append((pending, ""))
            pending = message.content
        else:
            history.append((pending or "", message.content))
            pending = None
    if pending is not None:
        history.append((pending, ""))
    return with_system_in_first_query(turns[-1].content, history, system or None)


def plan_messages(tokenizer, messages: Seq[Message], max_length: int, tools: Seq[Tool] = (),
                  tool_choice: ToolChoice = ToolChoice()) -> PromptPlan:
    """`plan_prompt` for role messages: models with a system role (ChatGLM3, GLM-4) keep the
    system messages as one system prompt; the others get them in front of the first query.
    With tools, or tool calls and results in the conversation: `plan_tool_conversation`; with
    a chat template: `plan_template_conversation`."""
    if chat_format_for(tokenizer).renders_template:
        return plan_template_conversation(tokenizer, messages, max_length, tools, tool_choice)
    if tools or any(m.role == "tool" or m.tool_calls for m in messages):
        return plan_tool_conversation(tokenizer, messages, max_length, tools, tool_choice)
    system = None
    if chat_format_for(tokenizer).supports_system_prompt:
        system = "\n".join(m.content for m in messages if m.role == "system") or None
        messages = [m for m in messages if m.role != "system"]
    query, history = pairs_from_messages(messages)
    return plan_prompt(tokenizer, query, history, max_length, system=system)


def plan_tool_conversation(tokenizer, messages: Seq[Message], max_length: int, tools: Seq[Tool],
                           tool_choice: ToolChoice) -> PromptPlan:
    """The prompt of a conversation with tools, laid out as the model's official code does
    (docs/tool-calling.md): the declared tools and the system text, the newest turns that fit
    (the module's history rule), then <|assistant|>, followed by the function's name when
    `tool_choice` names the call to make. Each turn is encoded once: a message's tokens do not
    depend on its neighbours in these formats."""
    chat_format = chat_format_for(tokenizer)
    if chat_format.tool_dialect is None:
        raise InvalidRequest(f"this model cannot call tools: tool calling needs {TOOL_MODELS}")
    offered, forced = _offered_tools(tools, tool_choice)
    budget = max_length - answer_reserve(max_length)
    system = "\n".join(m.content for m in messages if m.role == "system") or None
    if offered:
        functions = [json.loads(tool.function_json) for tool in offered]
        declared = chat_format.tool_dialect.system_messages(functions, system)
    else:
        declared = [("system", system)] if system else []
    head = list(tokenizer.prefix_tokens)
    for role, content in declared:
        head += chat_format.message(tokenizer, role, content)
    tail = [tokenizer.special_id("<|assistant|>")]
    if forced:
        tail += tokenizer.encode(f"{forced}\n", add_special_tokens=False)
    turns = _tool_turns([m for m in messages if m.role != "system"])
    room = budget - len(head) - len(tail)
    kept: list[list[int]] = []
    for turn in reversed(turns):
        try:
            tokens = [t for m in turn for role, metadata, content in chat_format.message_parts(m)
                      for t in chat_format.message(tokenizer, role, content, metadata)]
        except ValueError as error:
            raise InvalidRequest(str(error)) from None
        if len(tokens) > room:
            break
        kept.append(tokens)
        room -= len(tokens)
    if not kept:
        raise InvalidRequest(
            f"the last turn and the tools need more than the {budget} prompt tokens that maximum length "
            f"{max_length} leaves: shorten them or raise the maximum length")
    prompt = head + [t for tokens in reversed(kept) for t in tokens] + tail
    reader = ToolReader(chat_format.tool_dialect, tuple(t.name for t in offered), forced) if offered else None
    return PromptPlan(prompt, len(turns) - len(kept), chat_format.stop_ids(tokenizer), reader)


def plan_template_conversation(tokenizer, messages: Seq[Message], max_length: int, tools: Seq[Tool] = (),
                               tool_choice: ToolChoice = ToolChoice()) -> PromptPlan:
    """The prompt of a conversation rendered by the checkpoint's chat template: every system
    message, the newest turns that fit (a turn as in `plan_tool_conversation`), the tools the
    request offers (as the client sent them), and the template's generation prompt, followed by
    the function's name when `tool_choice` names the call to make."""
    chat_format = chat_format_for(tokenizer)
    uses_tools = bool(tools) or any(m.role == "tool" or m.tool_calls for m in messages)
    if uses_tools and chat_format.tool_dialect is None:
        raise InvalidRequest(f"this model cannot call tools: tool calling needs {TOOL_MODELS}")
    offered, forced = _offered_tools(tools, tool_choice)
    if chat_format.opens_thinking:
        forced = None  # the answer starts with thinking: the call comes after it, as the model decides
    functions = [{"type": "function", "function": json.loads(tool.function_json)} for tool in offered] or None
    system = [m for m in messages if m.role == "system"]
    turns = _tool_turns([m for m in messages if m.role != "system"])
    budget = max_length - answer_reserve(max_length)
    tail = tokenizer.encode(f"{forced}\n", add_special_tokens=False) if forced else []
    prompts: dict[int, list[int]] = {}

    def prompt_keeping(kept: int) -> list[int]:
        if kept not in prompts:
            shown = system + [m for turn in turns[len(turns) - kept:] for m in turn]
            prompts[kept] = chat_format.encode_messages(tokenizer, template_messages(shown), functions) + tail
        return prompts[kept]

    def fits_more(extra: int) -> bool:  # the newest turn and `extra` turns before it
        return len(prompt_keeping(extra + 1)) <= budget

    if not fits_more(0):
        raise InvalidRequest(
            f"the last turn{' and the tools' if offered else ''} need {len(prompt_keeping(1))} tokens, more than the "
            f"{budget} prompt tokens that maximum length {max_length} leaves: shorten them or raise the maximum length")
    kept = _most_that_fit(fits_more, len(turns) - 1, len(turns) - 1) + 1
    reader = ToolReader(chat_format.tool_dialect, tuple(t.name for t in offered), forced) if offered else None
    return PromptPlan(prompt_keeping(kept), len(turns) - kept, chat_format.stop_ids(tokenizer), reader)


def _offered_tools(tools: Seq[Tool], tool_choice: ToolChoice) -> tuple[list[Tool], Optional[str]]:
    """The tools the prompt declares, and the function whose call the prompt starts, if any."""
    if tool_choice.mode == "none":
        return [], None
    if tool_choice.mode == "function":
        chosen = [tool for tool in tools if tool.name == tool_choice.name]
        if not chosen:
            raise InvalidRequest(f"tool_choice names {tool_choice.name!r}, which is not one of the tools")
        return chosen, tool_choice.name
    if tool_choice.mode == "required":
        if len(tools) != 1:
            raise InvalidRequest("tool_choice 'required' works with exactly one tool on this model (it cannot be "
                                 "made to pick one of several): name the function to call instead")
        return list(tools), tools[0].name
    return list(tools), None


def _tool_turns(messages: list[Message]) -> list[list[Message]]:
    """Messages grouped into turns, each from a user message up to the next one."""
    if not messages or messages[-1].role not in ("user", "tool"):
        raise InvalidRequest("the conversation must end with a user message or a tool result")
    turns: list[list[Message]] = []
    for message in messages:
        if message.role == "user" or not turns:
            turns.append([])
        turns[-1].append(message)
    return turns
