"""Which turns of a conversation go into the prompt, encoded in the tokenizer's chat format.

History rule: the prompt always holds the new query and as many of the most recent turns as fit
in `max_length` while leaving room for at least `answer_reserve(max_length)` answer tokens. The
oldest turns are left out first; `PromptPlan.dropped_turns` says how many. A query that does not
fit even alone is refused with InvalidRequest. Planning costs about what encoding the turns that
fit costs, however long the history is (see `plan_prompt`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence as Seq

from ..protocol import InvalidRequest, Message
from .formats import History, chat_format_for, with_system_in_first_query


def answer_reserve(max_length: int) -> int:
    """Answer tokens the history budget keeps free: a quarter of max_length, at most 256."""
    return max(1, min(256, max_length // 4))


@dataclass(frozen=True)
class PromptPlan:
    tokens: list[int]
    dropped_turns: int
    stop_ids: frozenset = frozenset()  # the chat format's stop tokens (besides config.json's eos)


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


def plan_messages(tokenizer, messages: Seq[Message], max_length: int) -> PromptPlan:
    """`plan_prompt` for role messages: models with a system role (ChatGLM3, GLM-4) keep the
    system messages as one system prompt; the others get them in front of the first query."""
    system = None
    if chat_format_for(tokenizer).supports_system_prompt:
        system = "\n".join(m.content for m in messages if m.role == "system") or None
        messages = [m for m in messages if m.role != "system"]
    query, history = pairs_from_messages(messages)
    return plan_prompt(tokenizer, query, history, max_length, system=system)
