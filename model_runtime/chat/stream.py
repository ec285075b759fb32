"""The seed's `model.chat` and `model.stream_chat`: one answer at a time on the model's own
one-slot decode batch, apart from any engine's (many users share a model through the engine)."""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence as Seq

from ..protocol import SamplingParams
from ..serving.decode_batch import DecodeBatch, new_sequence
from .answer_text import AnswerText
from .formats import History, chat_format_for
from .planning import plan_prompt

@dataclass(frozen=True)
class AnswerUpdate:
    text: str
    delta: str
    prompt_tokens: int
    completion_tokens: int
    dropped_turns: int
    finish_reason: Optional[str] = None  # set on the last update: stop, length or cancelled
    thinking: str = ""  # a reasoning model's thinking so far (GLM-Z1); `text` is the visible reply


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
                            finish_reason, text.thinking)

    try:
        batch.prefill([seq])
        while not seq.finished:
            if cancel is not None and cancel.is_set():
                break
            delta = text.update(seq.generated)
            if delta or text.reasoning_delta:
                yield snapshot(delta)
            if text.stopped:
                break
            batch.step([seq])
    finally:
        with _chat_batches_lock:
            batch.release(seq)  # causal models keep the conversation's keys/values for its next turn
    delta = text.finish(seq.generated)
    yield snapshot(delta, "stop" if text.stopped else seq.finish_reason or "cancelled")


def sampling_with_defaults(tokenizer, max_length: Optional[int] = None, top_p: Optional[float] = None,
                           temperature: Optional[float] = None, top_k: int = 50,
                           repetition_penalty: Optional[float] = None, seed: Optional[int] = None) -> SamplingParams:
    """Sampling settings, those left out (None) at the model's reference defaults."""
    defaults = chat_format_for(tokenizer).default_sampling
    return SamplingParams(
        max_length=defaults.max_length if max_length is None else max_length,
        top_p=defaults.top_p if top_p is None else top_p,
        temperature=defaults.temperature if temperature is None else temperature, top_k=top_k,
        repetition_penalty=defaults.repetition_penalty if repetition_penalty is None else repetition_penalty,
        seed=seed)


def stream_chat(model, tokenizer, query: str, history: Optional[History] = None, max_length: Optional[int] = None,
                top_p: Optional[float] = None, temperature: Optional[float] = None, top_k: int = 50,
                repetition_penalty: Optional[float] = None, seed: Optional[int] = None,
                cancel: Optional[threading.Event] = None, system: Optional[str] = None) -> Iterator[tuple[str, History]]:
    """The seed's streaming chat: yields (response so far, history including this turn).
    Sampling settings left out take the model's reference defaults (ChatGLM-6B: max_length 2048,
    top_p 0.7, temperature 0.95; see chat.formats for the others)."""
    history = list(history or [])
    params = sampling_with_defaults(tokenizer, max_length, top_p, temperature, top_k, repetition_penalty, seed)
    for update in stream_answer(model, tokenizer, query, history, params, cancel, system=system):
        yield update.text, history + [(query, update.text)]


def chat(model, tokenizer, query: str, history: Optional[History] = None, **kwargs) -> tuple[str, History]:
    """The seed's `response, history = model.chat(tokenizer, query, history, ...)`."""
    response, new_history = "", list(history or []) + [(query, "")]
    for response, new_history in stream_chat(model, tokenizer, query, history, **kwargs):
        pass
    return response, new_history
