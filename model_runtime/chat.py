"""ChatGLM-6B conversations: the round prompt, the history budget, and streamed answer text.

History rule: the prompt always holds the new query and as many of the most recent turns as fit
in `max_length` while leaving room for at least `answer_reserve(max_length)` answer tokens. The
oldest turns are left out first; `PromptPlan.dropped_turns` says how many. A query that does not
fit even alone is refused with InvalidRequest.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence as Seq

from .generate import DecodeBatch, new_sequence
from .protocol import InvalidRequest, Message, SamplingParams

History = list[tuple[str, str]]

_CJK = "\u4e00-\u9fff"
_HALF_TO_FULL = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}
_PUNCT_NEAR_CJK = [
    re.compile(rf"([,!:;?])([{_CJK}])"),  # before a CJK character
    re.compile(rf"([{_CJK}])([,!:;?])"),  # after a CJK character
]


def round_prompt(query: str, history: Seq[tuple[str, str]]) -> str:
    """The ChatGLM-6B prompt: the bare query, or numbered rounds when there is history."""
    if not history:
        return query
    rounds = [f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history)]
    return "".join(rounds) + f"[Round {len(history)}]\n问：{query}\n答："


def process_response(text: str) -> str:
    """The reference's clean-up: strip, date placeholder, full-width punctuation next to CJK."""
    text = text.strip().replace("[[训练时间]]", "2023年")
    text = _PUNCT_NEAR_CJK[0].sub(lambda m: _HALF_TO_FULL[m[1]] + m[2], text)
    return _PUNCT_NEAR_CJK[1].sub(lambda m: m[1] + _HALF_TO_FULL[m[2]], text)


def answer_reserve(max_length: int) -> int:
    """Answer tokens the history budget keeps free: a quarter of max_length, at most 256."""
    return max(1, min(256, max_length // 4))


@dataclass(frozen=True)
class PromptPlan:
    tokens: list[int]
    dropped_turns: int


def plan_prompt(tokenizer, query: str, history: Seq[tuple[str, str]], max_length: int) -> PromptPlan:
    """Encode query plus the newest history turns that fit (see the module's history rule)."""
    if not isinstance(query, str):
        raise InvalidRequest(f"the query must be a string, got {type(query).__name__}")
    budget = max_length - answer_reserve(max_length)
    for dropped in range(len(history) + 1):
        tokens = tokenizer.encode(round_prompt(query, history[dropped:]))
        if len(tokens) <= budget:
            return PromptPlan(tokens, dropped)
    raise InvalidRequest(
        f"the message is {len(tokens)} tokens long, but with maximum length {max_length} a prompt may "
        f"hold at most {budget}: shorten the message or raise the maximum length")


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
    query = turns[-1].content
    if system:
        if history:
            history[0] = (f"{system}\n{history[0][0]}", history[0][1])
        else:
            query = f"{system}\n{query}"
    return query, history


class AnswerText:
    """The answer as it streams: decoded, post-processed, and only ever appended to.

    Text is held back while it could still change: a half UTF-8 character (U+FFFD), ASCII
    punctuation that a following CJK character would turn full-width, an unclosed "[[".
    """

    _UNSTABLE_TAIL = re.compile(r"(\ufffd+|[,!:;?]|\[\[[^\]]*\]?)$")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.shown = ""

    def update(self, answer_tokens: list[int]) -> str:
        """New stable text since the last call."""
        raw = self.tokenizer.decode(answer_tokens)
        stable = process_response(self._UNSTABLE_TAIL.sub("", raw))
        if not stable.startswith(self.shown):
            return ""
        delta, self.shown = stable[len(self.shown):], stable
        return delta

    def finish(self, answer_tokens: list[int]) -> str:
        """The rest of the text once the answer is complete (nothing is held back any more)."""
        final = process_response(self.tokenizer.decode(answer_tokens).replace("\ufffd", ""))
        delta = final[len(self.shown):] if final.startswith(self.shown) else ""
        self.shown = final
        return delta


@dataclass(frozen=True)
class AnswerUpdate:
    text: str
    delta: str
    prompt_tokens: int
    completion_tokens: int
    dropped_turns: int
    finish_reason: Optional[str] = None  # set on the last update: stop, length or cancelled


def stream_answer(model, tokenizer, query: str, history: Seq[tuple[str, str]], params: SamplingParams,
                  cancel: Optional[threading.Event] = None) -> Iterator[AnswerUpdate]:
    """One answer, token by token, on the model's own single-slot cache (not thread-safe: many
    users share a model through the engine instead)."""
    params.validate()
    max_length = min(params.max_length, model.config.max_sequence_length)
    plan = plan_prompt(tokenizer, query, history, max_length)
    seq = new_sequence(model, plan.tokens, params)
    batch = DecodeBatch(model, slots=1, max_len=model.config.max_sequence_length, vocab_size=tokenizer.vocab_size)
    batch.admit(seq)
    text = AnswerText(tokenizer)

    def snapshot(delta, finish_reason=None):
        return AnswerUpdate(text.shown, delta, len(plan.tokens), len(seq.generated), plan.dropped_turns,
                            finish_reason)

    batch.prefill([seq])
    while not seq.finished:
        if cancel is not None and cancel.is_set():
            break
        delta = text.update(seq.generated)
        if delta:
            yield snapshot(delta)
        batch.step([seq])
    delta = text.finish(seq.generated)
    yield snapshot(delta, seq.finish_reason or "cancelled")


def stream_chat(model, tokenizer, query: str, history: Optional[History] = None, max_length: int = 2048,
                top_p: float = 0.7, temperature: float = 0.95, top_k: int = 50,
                repetition_penalty: float = 1.0, seed: Optional[int] = None,
                cancel: Optional[threading.Event] = None) -> Iterator[tuple[str, History]]:
    """The seed's streaming chat: yields (response so far, history including this turn)."""
    history = list(history or [])
    params = SamplingParams(max_length=max_length, top_p=top_p, temperature=temperature, top_k=top_k,
                            repetition_penalty=repetition_penalty, seed=seed)
    for update in stream_answer(model, tokenizer, query, history, params, cancel):
        yield update.text, history + [(query, update.text)]


def chat(model, tokenizer, query: str, history: Optional[History] = None, **kwargs) -> tuple[str, History]:
    """The seed's `response, history = model.chat(tokenizer, query, history, ...)`."""
    response, new_history = "", list(history or []) + [(query, "")]
    for response, new_history in stream_chat(model, tokenizer, query, history, **kwargs):
        pass
    return response, new_history
