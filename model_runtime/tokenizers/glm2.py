"""ChatGLM2-6B and ChatGLM3-6B's tokenizer: SentencePiece `tokenizer.model`, then the specials."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..chat.formats import FORMATS
from .common import load_sentencepiece
from .special_tokens import SpecialTokens, checked_text

# Specials after the SentencePiece pieces, in id order (ChatGLM3 adds the four roles).
CHATGLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
CHATGLM3_SPECIALS = CHATGLM2_SPECIALS + ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


class ChatGLM2Tokenizer(SpecialTokens):
    """ChatGLM2-6B / ChatGLM3-6B: SentencePiece `tokenizer.model`, specials after its pieces
    ([MASK] 64789 ... with the real file). family "chatglm3" adds <|system|> ... <|observation|>."""

    def __init__(self, model_file: str | Path, family: str = "chatglm3"):
        if family not in ("chatglm2", "chatglm3"):
            raise ValueError(f"family must be chatglm2 or chatglm3, got {family!r}")
        model_file = Path(model_file)
        self._sp = load_sentencepiece(model_file)
        self.model_file = model_file
        self.family = family
        self.chat_format = FORMATS[family]
        self.specials = CHATGLM3_SPECIALS if family == "chatglm3" else CHATGLM2_SPECIALS
        self._set_specials(self._sp.get_piece_size())
        self.unk_token_id = self.pad_token_id = self._sp.unk_id()
        self.eos_token_id = self._sp.eos_id()
        self._control = frozenset(i for i in range(min(self.first_special, 512))
                                  if self._sp.is_control(i) or self._sp.is_unknown(i))

    def encode_text(self, text: str) -> list[int]:
        return self._sp.encode(checked_text(text))

    def decode_text(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _is_control(self, token_id: int) -> bool:
        return token_id in self._control

    def _special_string(self, token_id: int) -> str:
        if token_id < self.first_special:
            return self._sp.id_to_piece(token_id)
        return self.index_special_tokens[token_id]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._special_string(i) if i >= self.first_special else self._sp.id_to_piece(i)
                for i in map(self._checked, ids)]

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        return [self.special_tokens[token] if token in self.special_tokens else self._sp.piece_to_id(token)
                for token in tokens]
