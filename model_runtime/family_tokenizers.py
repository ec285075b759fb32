"""Tokenizers of ChatGLM2-6B, ChatGLM3-6B (SentencePiece) and GLM-4 (tiktoken-format BPE).

Both put their special tokens after the ordinary vocabulary and start every prompt with
`[gMASK] sop` (`[gMASK]<sop>` for GLM-4). Special-token strings inside text are ordinary text:
`encode("<|user|>")` gives the ids of the characters, never the control token, so a user cannot
forge a role turn. Only the chat formats (`chat_formats.py`) put control tokens in a prompt.

They offer the calls the shared code uses on ChatGLM-6B's tokenizer: `encode(text,
add_special_tokens=True)`, `decode(ids, skip_special_tokens=True)`, `vocab_size`, the special ids,
`convert_ids_to_tokens`, `convert_tokens_to_ids`, plus `special_id(name)`.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Iterable, Optional


from .chat_formats import FORMATS
from .tokenizer import load_sentencepiece

# Specials after the SentencePiece pieces, in id order (ChatGLM3 adds the four roles).
CHATGLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
CHATGLM3_SPECIALS = CHATGLM2_SPECIALS + ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
# GLM-4's specials after its 151,329 BPE ranks, in id order.
GLM4_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>")
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates cannot reach the C++/Rust side
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


class _SpecialTokens:
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
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        return token_id

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


class ChatGLM2Tokenizer(_SpecialTokens):
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
        return self._sp.encode(_check_text(text))

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


class GLM4Tokenizer(_SpecialTokens):
    """GLM-4: the tiktoken-format `tokenizer.model`, cl100k-style pre-tokenizer, specials from
    <|endoftext|> (151329 with the real file) on."""

    specials = GLM4_SPECIALS
    sop_name = "<sop>"

    def __init__(self, model_file: str | Path):
        import tiktoken

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
        return self._bpe.encode_ordinary(_check_text(text))

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


def load_family_tokenizer(folder: Path, family: str, config: Optional[dict] = None):
    """The tokenizer of a ChatGLM2/ChatGLM3/GLM-4 checkpoint folder."""
    folder = Path(folder)
    vocab_file = "tokenizer.model"
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        try:
            vocab_file = json.loads(config_file.read_text(encoding="utf-8")).get("vocab_file", vocab_file)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    path = folder / vocab_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a {family} checkpoint needs its tokenizer.model")
    if family == "glm4":
        return GLM4Tokenizer(path)
    return ChatGLM2Tokenizer(path, family)
