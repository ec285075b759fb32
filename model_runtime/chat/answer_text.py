"""An answer's text as it streams: what may be shown so far, never taken back."""
from __future__ import annotations

import re
from typing import Sequence as Seq

from .formats import chat_format_for


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
