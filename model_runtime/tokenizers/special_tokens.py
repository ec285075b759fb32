"""What the tokenizers of ChatGLM2-6B, ChatGLM3-6B and GLM-4 share.

Both put their special tokens after the ordinary vocabulary and start every prompt with
`[gMASK] sop` (`[gMASK]<sop>` for GLM-4). Special-token strings inside text are ordinary text:
`encode("<|user|>")` gives the ids of the characters, never the control token, so a user cannot
forge a role turn. Only the chat formats (`chat/formats.py`) put control tokens in a prompt.

They offer the calls the shared code uses on ChatGLM-6B's tokenizer: `encode(text,
add_special_tokens=True)`, `decode(ids, skip_special_tokens=True)`, `vocab_size`, the special ids,
`convert_ids_to_tokens`, `convert_tokens_to_ids`, plus `special_id(name)`.
"""
from __future__ import annotations

from typing import Iterable

from .common import checked_id, without_lone_surrogates


def checked_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    return without_lone_surrogates(text)


class SpecialTokens:
    """Shared id bookkeeping: ordinary ids below `first_special`, named specials from there on."""

    specials: tuple[str, ...] = ()
    gmask_name = "[gMASK]"
    sop_name = "sop"

    def _set_specials(self, first_special: int) -> None:
        self.first_special = first_special
        self.special_tokens = {name: first_special + i for i, name in enumerate(self.specials)}
        self.index_special_tokens = {i: name for name, i in self.special_tokens.items()}
        self.vocab_size = first_special + len(self.specials)
        self.gmask_token_id = self.special_tokens[self.gmask_name]
        self.sop_token_id = self.bos_token_id = self.special_tokens[self.sop_name]
        self.mask_token_id = self.special_tokens["[MASK]"]

    def special_id(self, name: str) -> int:
        """Id of a special token by its string ("<|user|>", "[gMASK]"...)."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a special token of this tokenizer") from None

    @property
    def prefix_tokens(self) -> list[int]:
        """What every prompt starts with: [gMASK] sop."""
        return [self.gmask_token_id, self.sop_token_id]

    def _checked(self, token_id) -> int:
        return checked_id(token_id, self.vocab_size)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text` (special strings in it are plain text), after [gMASK] sop when
        add_special_tokens."""
        ids = self.encode_text(text)
        return self.prefix_tokens + ids if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ids; special tokens are dropped, or written as their strings."""
        parts, segment = [], []
        for token_id in map(self._checked, ids):
            if token_id >= self.first_special or self._is_control(token_id):
                if not skip_special_tokens:
                    if segment:
                        parts.append(self.decode_text(segment))
                        segment = []
                    parts.append(self._special_string(token_id))
                continue
            segment.append(token_id)
        if segment:
            parts.append(self.decode_text(segment))
        return "".join(parts)

    def _is_control(self, token_id: int) -> bool:
        return False

    def _special_string(self, token_id: int) -> str:
        return self.index_special_tokens[token_id]
