"""Thinking apart from the answer, for reasoning models (GLM-Z1): the answer is thinking,
`</think>`, then the visible reply. GLM-Z1's template opens the `<think>` block in the prompt
(`TemplateFormat.opens_thinking`), so the generated text starts inside it; a model whose
template does not open it writes `<think>` itself first. Only the visible reply is the
answer: it is what goes back into the history, what /v1 calls `content` (the thinking is
`reasoning_content`), and what tool calls are read from.
"""
from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of text that is a proper beginning of marker (0 if none)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def split_thinking(raw: str, opened: bool, final: bool) -> tuple[str, str]:
    """(thinking, visible reply) of an answer's text so far. While it streams (not final), what
    could still turn out to be a marker is held back (a partial `</think>`, or a beginning that
    may become `<think>`), so both parts only ever grow; thinking never closed is all thinking.
    The thinking is stripped: trailing whitespace waits until more text follows it."""
    text = raw
    if not opened:
        stripped = raw.lstrip()
        if stripped.startswith(THINK_OPEN):
            text = stripped[len(THINK_OPEN):]
        elif not final and THINK_OPEN.startswith(stripped):
            return "", ""  # the answer may still open a <think> block
        else:
            return "", raw
    end = text.find(THINK_CLOSE)
    if end < 0:
        thinking = text if final else text[:len(text) - _partial_suffix(text, THINK_CLOSE)]
        return thinking.strip(), ""
    return text[:end].strip(), text[end + len(THINK_CLOSE):]


def visible_reply(text: str) -> str:
    """An answer as history keeps it: the text after the last `</think>` (the whole text when it
    has none), as GLM-Z1's template shows earlier turns."""
    return text.split(THINK_CLOSE)[-1].strip()
