"""GLM-4's tokenizer: a tiktoken-format byte-level BPE (`tokenizer.model`), then the specials."""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Iterable

import tiktoken

from ..chat.formats import FORMATS
from .special_tokens import SpecialTokens, checked_text

# GLM-4's specials after its 151,329 BPE ranks, in id order.
GLM4_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>")
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """GLM-4's tokenizer.model: one `base64(token bytes) rank` per line."""
    ranks = {}
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, base64.binascii.Error):
            raise ValueError(f"{path}:{number}: not a tiktoken 'base64 rank' line") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once")
    return ranks


class GLM4Tokenizer(SpecialTokens):
    """GLM-4: the tiktoken-format `tokenizer.model`, cl100k-style pre-tokenizer, specials from
    <|endoftext|> (151329 with the real file) on."""

    specials = GLM4_SPECIALS
    sop_name = "<sop>"

    def __init__(self, model_file: str | Path):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"tokenizer model {model_file} not found")
        self.model_file = model_file
        self.family = "glm4"
        self.chat_format = FORMATS["glm4"]
        ranks = read_tiktoken_ranks(model_file)
        # No special tokens inside tiktoken: text is always encoded as ordinary text.
        self._bpe = tiktoken.Encoding(name=f"glm4:{model_file}", pat_str=GLM4_PATTERN, mergeable_ranks=ranks,
                                      special_tokens={})
        self._set_specials(len(ranks))
        self.eos_token_id = self.pad_token_id = self.special_tokens["<|endoftext|>"]
        self.unk_token_id = self.eos_token_id

    def encode_text(self, text: str) -> list[int]:
        return self._bpe.encode_ordinary(checked_text(text))

    def decode_text(self, ids: list[int]) -> str:
        return self._bpe.decode(ids, errors="replace")

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.index_special_tokens[i] if i >= self.first_special
                else self._bpe.decode_single_token_bytes(i).decode("utf-8", "backslashreplace")
                for i in map(self._checked, ids)]

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        out = []
        for token in tokens:
            if token in self.special_tokens:
                out.append(self.special_tokens[token])
            else:
                out.append(self._bpe.encode_single_token(token.encode("utf-8")))
        return out


def is_tiktoken_file(path: Path) -> bool:
    """GLM-4's tokenizer.model is text (`base64 rank` lines); SentencePiece's is a protobuf."""
    try:
        head = Path(path).read_bytes()[:256]
    except OSError:
        return False
    first = head.split(b"\n", 1)[0].split()
    return len(first) == 2 and first[1].isdigit() and all(c < 128 for c in head)
