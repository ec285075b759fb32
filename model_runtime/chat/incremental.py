"""Decoding a growing answer at constant cost per token."""
from __future__ import annotations

from typing import Optional, Sequence


class IncrementalDecoder:
    """`tokenizer.decode(tokens)` for a token list that only grows, without decoding it whole at
    every step (which made a long answer cost O(n) per token): the text of all but the newest
    tokens is kept, and only those are decoded again, after a few tokens of context, since
    SentencePiece and byte-level BPE read a piece differently at the start of a text. The kept
    part moves on only at a whole character. U+FFFD (bytes of a character not yet complete) is
    dropped, as everywhere in the answer text. tests/test_chat.py checks it against a whole
    decode at every length, for every family's tokenizer."""

    CONTEXT = 4  # tokens decoded before the tail only so that it reads right
    TAIL = 16  # the newest tokens, decoded again each time; the kept part moves in steps of this

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.kept_tokens = 0
        self.kept_text = ""

    def text(self, tokens: Sequence[int]) -> str:
        if len(tokens) - self.kept_tokens >= 2 * self.TAIL:
            end = len(tokens) - self.TAIL
            piece = self._piece(tokens, self.kept_tokens, end)
            if piece is not None and not piece.endswith("\ufffd"):
                self.kept_text += piece
                self.kept_tokens = end
        tail = self._piece(tokens, self.kept_tokens, len(tokens))
        if tail is None:  # the context read the kept text differently: decode it all again
            self.kept_tokens, self.kept_text = 0, ""
            tail = self.tokenizer.decode(list(tokens))
        return (self.kept_text + tail).replace("\ufffd", "")

    def _piece(self, tokens: Sequence[int], start: int, end: int) -> Optional[str]:
        """The text tokens[start:end] add after tokens[:start]; None if that cannot be told."""
        if start == 0:
            return self.tokenizer.decode(list(tokens[:end]))
        context = max(0, start - self.CONTEXT)
        before = self.tokenizer.decode(list(tokens[context:start]))
        both = self.tokenizer.decode(list(tokens[context:end]))
        return both[len(before):] if both.startswith(before) else None
