"""ChatGLM-6B tokenizer on the `sentencepiece` package alone (no transformers).

It reproduces the published tokenizer: newlines, tabs and runs of spaces are rewritten into the
pieces `<n>`, `<|tab|>` and `<|blank_N|>` before SentencePiece sees the text (SentencePiece would
otherwise fold them into single spaces), and a prompt ends with `[gMASK] <sop>`.

Two facts of `ice_text.model` that callers may notice:
- The model keeps SentencePiece's dummy prefix: "你好" is `▁` + `你好`, so prompts start with a
  `▁`-piece exactly as in the reference ids. (The reference's trick of encoding "<n>" + text and
  dropping two pieces only serves its add_dummy_prefix=False option, which prompts do not use.)
- Its normaliser is nmt_nfkc with remove_extra_whitespaces, so a single leading or trailing
  space is dropped (" hello " encodes like "hello"), full-width characters become ASCII, `\\r`
  becomes a space and most control characters vanish (`\\x00` survives as a byte piece).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from .common import checked_id, json_object_file, load_sentencepiece, token_string, without_lone_surrogates

MAX_BLANK = 80
_ENCODE_PATTERN = re.compile(r"\n|\t| {2,}")
_DECODE_PATTERN = re.compile(r"<n>|<\|tab\|>|<\|blank_\d{1,2}\|>")
_DECODE_MAP = {"<n>": "\n", "<|tab|>": "\t"} | {
    f"<|blank_{n}|>": " " * n for n in range(2, MAX_BLANK + 1)
}
_NEWLINE_PIECE = "<n>"


def _whitespace_piece(match: re.Match) -> str:
    """`\\n`, `\\t` and a run of spaces as ChatGLM pieces; runs over 80 become 80s plus the rest
    (a lone leftover space stays a space), as the reference's longest-first replacement does."""
    text = match[0]
    if text == "\n":
        return "<n>"
    if text == "\t":
        return "<|tab|>"
    full, rest = divmod(len(text), MAX_BLANK)
    tail = f"<|blank_{rest}|>" if rest > 1 else " " * rest
    return f"<|blank_{MAX_BLANK}|>" * full + tail


def encode_whitespace(text: str) -> str:
    """Rewrite newlines, tabs and space runs into ChatGLM pieces (what SentencePiece sees)."""
    return _ENCODE_PATTERN.sub(_whitespace_piece, text)


class ChatGLMTokenizer:
    """Text <-> ids for ChatGLM-6B. Token id = SentencePiece id + num_image_tokens."""

    def __init__(
        self,
        model_file: str | Path,
        *,
        bos_token: str = "<sop>",
        eos_token: str = "<eop>",
        gmask_token: str = "[gMASK]",
        mask_token: str = "[MASK]",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        num_image_tokens: int = 0,
        remove_space: bool = False,
        do_lower_case: bool = False,
    ):
        model_file = Path(model_file)
        self._sp = load_sentencepiece(model_file)
        self.model_file = model_file
        self.num_image_tokens = num_image_tokens
        self.remove_space = remove_space
        self.do_lower_case = do_lower_case
        self.vocab_size = self._sp.get_piece_size() + num_image_tokens

        self.bos_token, self.eos_token, self.gmask_token = bos_token, eos_token, gmask_token
        self.mask_token, self.pad_token, self.unk_token = mask_token, pad_token, unk_token
        self.bos_token_id = self._special_id(bos_token)
        self.eos_token_id = self._special_id(eos_token)
        self.gmask_token_id = self._special_id(gmask_token)
        self.mask_token_id = self._special_id(mask_token)
        self.pad_token_id = self._special_id(pad_token)
        self.unk_token_id = self._special_id(unk_token)
        self._newline_sp_id = self._special_id(_NEWLINE_PIECE) - num_image_tokens
        # Control pieces (<s>, [sMASK], <ENC>...) decode to nothing in SentencePiece; listing them
        # lets decode(skip_special_tokens=False) show them and keeps <unk> out of clean text.
        self._special_ids = frozenset(
            i + num_image_tokens
            for i in range(self._sp.get_piece_size())
            if self._sp.is_control(i) or self._sp.is_unknown(i)
        ) | {self.bos_token_id, self.eos_token_id, self.gmask_token_id, self.mask_token_id,
             self.pad_token_id, self.unk_token_id}

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ChatGLMTokenizer":
        """Load from a checkpoint folder: tokenizer_config.json plus its vocab file."""
        directory = Path(directory)
        config_file = directory / "tokenizer_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found")
        config = json_object_file(config_file)
        token_keys = ("bos_token", "eos_token", "gmask_token", "mask_token", "pad_token", "unk_token")
        options = {key: token_string(config[key]) for key in token_keys if key in config}
        for key in ("num_image_tokens", "remove_space", "do_lower_case"):
            if key in config:
                options[key] = config[key]
        return cls(directory / config.get("vocab_file", "ice_text.model"), **options)

    def _special_id(self, token: str) -> int:
        """Id of a piece that must exist in the model (a missing one would silently map to <unk>)."""
        sp_id = self._sp.piece_to_id(token)
        if sp_id == self._sp.unk_id() and token != self._sp.id_to_piece(sp_id):
            raise ValueError(f"token {token!r} is not a piece of {self.model_file}")
        return sp_id + self.num_image_tokens

    def _checked(self, token_id) -> int:
        return checked_id(token_id, self.vocab_size)

    def preprocess(self, text: str) -> str:
        """The text SentencePiece sees: whitespace as ChatGLM pieces, lone surrogates as U+FFFD."""
        if self.remove_space:
            text = " ".join(text.split())
        if self.do_lower_case:
            text = text.lower()
        return encode_whitespace(without_lone_surrogates(text))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`, followed by [gMASK] <sop> (the prompt format) when add_special_tokens."""
        offset = self.num_image_tokens
        ids = [i + offset for i in self._sp.encode(self.preprocess(text))]
        if add_special_tokens:
            ids += [self.gmask_token_id, self.bos_token_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Special tokens are dropped, or written as their strings when
        skip_special_tokens is False; the text between them decodes the same either way."""
        parts: list[str] = []
        segment: list[int] = []
        started = False  # SentencePiece drops the dummy-prefix space only at the very start

        def flush() -> None:
            nonlocal started
            if not segment:
                return
            if started:  # decode after a known piece so that a leading "▁" stays a space
                parts.append(self._sp.decode([self._newline_sp_id] + segment)[len(_NEWLINE_PIECE):])
            else:
                parts.append(self._sp.decode(segment))
            started = True
            segment.clear()

        for token_id in map(self._checked, ids):
            if token_id < self.num_image_tokens:
                continue  # image tokens have no text (the reference drops them too)
            if token_id in self._special_ids:
                if not skip_special_tokens:
                    flush()
                    parts.append(self._sp.id_to_piece(token_id - self.num_image_tokens))
                continue
            segment.append(token_id - self.num_image_tokens)
        flush()
        return _DECODE_PATTERN.sub(lambda m: _DECODE_MAP.get(m[0], m[0]), "".join(parts))

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Piece strings of `ids` (image tokens as `<image_N>`)."""
        tokens = []
        for token_id in map(self._checked, ids):
            if token_id < self.num_image_tokens:
                tokens.append(f"<image_{token_id}>")
            else:
                tokens.append(self._sp.id_to_piece(token_id - self.num_image_tokens))
        return tokens

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        """Ids of piece strings; an unknown string gives unk_token_id."""
        return [self._sp.piece_to_id(token) + self.num_image_tokens for token in tokens]
