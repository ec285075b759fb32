"""An answer's text as it streams: what may be shown so far, never taken back."""
from __future__ import annotations

import re
from typing import Optional, Sequence as Seq

from ..protocol import ToolCall
from .formats import chat_format_for
from .incremental import IncrementalDecoder
from .reasoning import split_thinking
from .tool_calls import ToolReader


class AnswerText:
    """The answer as it streams: decoded, post-processed, and only ever appended to.

    Text is held back while it could still change: a half UTF-8 character (U+FFFD), ASCII
    punctuation that a following CJK character would turn full-width, an unclosed "[[", or a
    tail that may be the start of a stop string. At a stop string the text ends (`stopped`).

    With a `tool_reader` (the request offered tools) a possible call is held back: the whole
    answer when its first line, the metadata, is not written yet or is not empty (a plain
    answer's is) or when the prompt named the function; else what follows an <|assistant|> token
    inside the answer (ChatGLM3 may write text, then a message with the call). At the end it is
    read as a call (`tool_calls`), the text before it being the answer's text, or, if it is not
    a well-formed call, shown as text too.

    Reasoning models (GLM-Z1: the format's `opens_thinking`): the thinking is split off the text
    first (reasoning.py) and kept in `thinking` (`reasoning_delta`: what the last update or finish
    added); everything above then applies to the visible reply alone, a call being read from it
    as text.
    """

    _UNSTABLE_TAIL = re.compile(r"(\ufffd+|[,!:;?]|\[\[[^\]]*\]?)$")

    def __init__(self, tokenizer, stop: Seq[str] = (), tool_reader: Optional[ToolReader] = None):
        self.tokenizer = tokenizer
        self.tool_reader = tool_reader
        self.tool_calls: tuple[ToolCall, ...] = ()
        chat_format = chat_format_for(tokenizer)
        self.process_response = chat_format.process_response
        self.reasoning = chat_format.opens_thinking
        self.thinking = ""
        self.reasoning_delta = ""
        self.stop = tuple(stop)
        self.stopped = False
        self.shown = ""
        self._decoder = IncrementalDecoder(tokenizer)
        if tool_reader is not None:
            self._assistant = tokenizer.special_id("<|assistant|>")
            self._cut: Optional[int] = None  # where an <|assistant|> token was found in the answer
            self._searched = 0

    def update(self, answer_tokens: list[int]) -> str:
        """New stable text since the last call."""
        # Bytes that are not (yet) a whole UTF-8 character decode to U+FFFD: at the end they may
        # still complete, in the middle (byte-level BPE, e.g. GLM-4) they never will. Dropped
        # everywhere, as finish() does, so that the text is only ever appended to.
        if self.reasoning:
            raw = self._reply(self._decoder.text(answer_tokens), final=False)
            if self.tool_reader is not None and self._may_be_call(raw):
                return ""
        else:
            text_tokens, _ = self._split(answer_tokens)
            if not text_tokens:
                return ""
            raw = self._decoder.text(text_tokens)
        stable = self._cut_at_stop(self.process_response(self._UNSTABLE_TAIL.sub("", raw)), final=False)
        if not stable.startswith(self.shown):
            return ""
        delta, self.shown = stable[len(self.shown):], stable
        return delta

    def _reply(self, raw: str, final: bool) -> str:
        """The visible reply of the raw text; the thinking goes to `thinking` / `reasoning_delta`."""
        thinking, reply = split_thinking(raw.replace("\ufffd", ""), opened=True, final=final)
        self.reasoning_delta = thinking[len(self.thinking):] if thinking.startswith(self.thinking) else ""
        self.thinking = thinking
        return reply

    def _may_be_call(self, text: str) -> bool:
        """Whether text, the start of an answer, may be a call: its first line (the metadata) is not
        written yet or is not empty, or the prompt already named the function."""
        metadata, newline, _ = text.partition("\n")
        return bool(self.tool_reader.forced or not newline or metadata.strip())

    def finish(self, answer_tokens: list[int]) -> str:
        """The rest of the text once the answer is complete (nothing is held back any more)."""
        if self.reasoning:
            raw = self._reply(self.tokenizer.decode(answer_tokens), final=True)
            call = self.tool_reader.read(raw.strip()) if self.tool_reader is not None and self._may_be_call(raw) else None
            raw = "" if call is not None else raw
        else:
            text_tokens, call_tokens = self._split(answer_tokens)
            call = None if call_tokens is None else self.tool_reader.read(self.tokenizer.decode(call_tokens))
            raw = self.tokenizer.decode(answer_tokens if call is None else text_tokens).replace("\ufffd", "")
        if call is not None:
            self.tool_calls = (call,)
        final = self._cut_at_stop(self.process_response(raw), final=True)
        delta = final[len(self.shown):] if final.startswith(self.shown) else ""
        self.shown = final
        return delta

    def _split(self, answer_tokens: list[int]) -> tuple[list[int], Optional[list[int]]]:
        """(the tokens of text that may be shown, the tokens of a possible call or None)."""
        if self.tool_reader is None:
            return answer_tokens, None
        if self._cut is None:
            try:
                self._cut = answer_tokens.index(self._assistant, self._searched)
            except ValueError:
                self._searched = len(answer_tokens)
        text = answer_tokens if self._cut is None else answer_tokens[:self._cut]
        if self._may_be_call(self._decoder.text(text) if text else ""):
            return [], answer_tokens
        return text, None if self._cut is None else answer_tokens[self._cut + 1:]

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


def reasoning_fields(text: Optional[AnswerText]) -> dict:
    """The ChatEvent fields of an answer's thinking (none for models that do not think)."""
    if text is None or not text.reasoning:
        return {}
    return {"reasoning": text.thinking, "reasoning_delta": text.reasoning_delta}
