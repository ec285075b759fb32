"""GLM conversations: the prompt (ChatGLM-6B's rounds here; every model's layout through
`chat_formats.chat_format_for`), the history budget, and streamed answer text.

History rule: the prompt always holds the new query and as many of the most recent turns as fit
in `max_length` while leaving room for at least `answer_reserve(max_length)` answer tokens. The
oldest turns are left out first; `PromptPlan.dropped_turns` says how many. A query that does not
fit even alone is refused with InvalidRequest. Planning costs about what encoding the turns that
fit costs, however long the history is (see `plan_prompt`).
"""
from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence as Seq

from .chat_formats import chat_format_for, with_system_in_first_query
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


class AnswerText:
    """The answer as it streams: decoded, post-processed, and only ever appended to.

    Text is held back while it could still change: a half UTF-8 character (U+FFFD), ASCII
    punctuation that a following CJK character would turn full-width, an unclosed "[[", or a
    tail that may be the start of a stop string. At a stop string the text ends (`stopped`).
    """

    _UNSTABLE_TAIL = re.compile(r"(\ufffd+|[,!:;?]|\[\[[^\]]*\]?)$")

    def __init__(self, tokenizer, stop: Seq[str] = ()):
        self.tokenizer = tokenizer
        self.process_response = chat_format_for(tokenizer).process_response
        self.stop = tuple(stop)
        self.stopped = False
        self.shown = ""

    def update(self, answer_tokens: list[int]) -> str:
        """New stable text since the last call."""
        # Bytes that are not (yet) a whole UTF-8 character decode to U+FFFD: at the end they may
        # still complete, in the middle (byte-level BPE, e.g. GLM-4) they never will. Dropped
        # everywhere, as finish() does, so that the text is only ever appended to.
        raw = self.tokenizer.decode(answer_tokens).replace("\ufffd", "")
        stable = self._cut_at_stop(self.process_response(self._UNSTABLE_TAIL.sub("", raw)), final=False)
        if not stable.startswith(self.shown):
            return ""
        delta, self.shown = stable[len(self.shown):], stable
        return delta

    def finish(self, answer_tokens: list[int]) -> str:
        """The rest of the text once the answer is complete (nothing is held back any more)."""
        raw = self.tokenizer.decode(answer_tokens).replace("\ufffd", "")
        final = self._cut_at_stop(self.process_response(raw), final=True)
        delta = final[len(self.shown):] if final.startswith(self.shown) else ""
        self.shown = final
        return delta

    def _cut_at_stop(self, text: str, final: bool) -> str:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return text[:min(hits)].rstrip()
        if not final:
            for size in range(max(map(len, self.stop), default=1) - 1, 0, -1):
                if any(s.startswith(text[-size:]) for s in self.stop):
                    return text[:-size].rstrip()
        return text


@dataclass(frozen=True)
class AnswerUpdate:
    text: str
    delta: str
    prompt_tokens: int
    completion_tokens: int
    dropped_turns: int
    finish_reason: Optional[str] = None  # set on the last update: stop, length or cancelled


# model.chat's own one-slot decode batch per model, kept between calls so that a conversation's
# next turn prefills only its new text (causal models). It is apart from any engine's batch.
CHAT_BATCHES: "weakref.WeakKeyDictionary[object, DecodeBatch]" = weakref.WeakKeyDictionary()
CHAT_SALT = "model.chat"  # one local user: their turns may reuse each other's keys and values
_chat_batches_lock = threading.Lock()


def _chat_batch(model, seq, max_length: int, vocab_size: int) -> DecodeBatch:
    """The model's chat batch with seq admitted, sized to the conversation's max_length (not the
    model's whole context: GLM-4's 131072 tokens would take GiBs); a private one when another
    thread's answer holds it."""
    with _chat_batches_lock:
        batch = CHAT_BATCHES.get(model)
        if batch is None or batch.max_len < max_length:
            batch = CHAT_BATCHES[model] = DecodeBatch(model, slots=1, max_len=max_length, vocab_size=vocab_size)
        if batch.admit(seq):
            return batch
    batch = DecodeBatch(model, slots=1, max_len=max_length, vocab_size=vocab_size)
    batch.admit(seq)
    return batch


def stream_answer(model, tokenizer, query: str, history: Seq[tuple[str, str]], params: SamplingParams,
                  cancel: Optional[threading.Event] = None, system: Optional[str] = None) -> Iterator[AnswerUpdate]:
    """One answer, token by token, on the model's own chat cache (`CHAT_BATCHES`; many users share
    a model through the engine instead). For causal models the cache keeps the conversation, so
    the next turn only prefills its new text. system: a system prompt (ChatGLM3/GLM-4; put before
    the first query for the others)."""
    params.validate()
    max_length = min(params.max_length, model.config.max_sequence_length)
    plan = plan_prompt(tokenizer, query, history, max_length, system=system)
    seq = new_sequence(model, plan.tokens, params, stop_ids=plan.stop_ids, cache_salt=CHAT_SALT)
    batch = _chat_batch(model, seq, max_length, tokenizer.vocab_size)
    text = AnswerText(tokenizer, params.stop)

    def snapshot(delta, finish_reason=None):
        return AnswerUpdate(text.shown, delta, len(plan.tokens), len(seq.generated), plan.dropped_turns,
                            finish_reason)

    try:
        batch.prefill([seq])
        while not seq.finished:
            if cancel is not None and cancel.is_set():
                break
            delta = text.update(seq.generated)
            if delta:
                yield snapshot(delta)
            if text.stopped:
                break
            batch.step([seq])
    finally:
        with _chat_batches_lock:
            batch.release(seq)  # causal models keep the conversation's keys/values for its next turn
    delta = text.finish(seq.generated)
    yield snapshot(delta, "stop" if text.stopped else seq.finish_reason or "cancelled")


def stream_chat(model, tokenizer, query: str, history: Optional[History] = None, max_length: Optional[int] = None,
                top_p: Optional[float] = None, temperature: Optional[float] = None, top_k: int = 50,
                repetition_penalty: Optional[float] = None, seed: Optional[int] = None,
                cancel: Optional[threading.Event] = None, system: Optional[str] = None) -> Iterator[tuple[str, History]]:
    """The seed's streaming chat: yields (response so far, history including this turn).
    Sampling settings left out take the model's reference defaults (ChatGLM-6B: max_length 2048,
    top_p 0.7, temperature 0.95; see chat_formats for the others)."""
    history = list(history or [])
    defaults = chat_format_for(tokenizer).default_sampling
    params = SamplingParams(
        max_length=defaults.max_length if max_length is None else max_length,
        top_p=defaults.top_p if top_p is None else top_p,
        temperature=defaults.temperature if temperature is None else temperature, top_k=top_k,
        repetition_penalty=defaults.repetition_penalty if repetition_penalty is None else repetition_penalty,
        seed=seed)
    for update in stream_answer(model, tokenizer, query, history, params, cancel, system=system):
        yield update.text, history + [(query, update.text)]


def chat(model, tokenizer, query: str, history: Optional[History] = None, **kwargs) -> tuple[str, History]:
    """The seed's `response, history = model.chat(tokenizer, query, history, ...)`."""
    response, new_history = "", list(history or []) + [(query, "")]
    for response, new_history in stream_chat(model, tokenizer, query, history, **kwargs):
        pass
    return response, new_history
