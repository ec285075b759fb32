"""A checkpoint's `tokenizer.json` (the HF `tokenizers` library's format) and its chat template:
GLM-4-0414, GLM-Z1 and glm-4-9b-chat-hf ship their tokenizer this way.

Two encodings, on purpose: `encode_text` reads special-token strings as ordinary text (a user
who types "<|user|>" gets the characters, never the role token, as with the other families'
tokenizers here), `encode_with_specials` turns them into their ids, as transformers does with a
rendered chat template; only the template's own output goes through the latter
(chat/template.py keeps message text apart).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer

from ..chat.template import TemplateFormat, json_object_file
from .common import checked_id
from .special_tokens import checked_text


def _token_string(value) -> str | None:
    """tokenizer_config.json stores a token as a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def read_chat_template(folder: Path, tokenizer_config: dict) -> str:
    """The checkpoint's chat template: `chat_template.jinja` when there is one (what transformers
    5 saves and prefers), else tokenizer_config.json's `chat_template` (a string, or a list of
    named templates of which "default" is used)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(template, str) or not template:
        raise ValueError(f"{folder / 'tokenizer_config.json'} has no chat_template (and there is no chat_template.jinja)")
    return template


class JSONTokenizer:
    """Text <-> ids with a checkpoint's tokenizer.json, and its chat template as `chat_format`.
    Offers the calls the shared code uses on the other tokenizers (encode, decode, vocab_size,
    special_id, prefix_tokens, eos/pad ids)."""

    def __init__(self, folder: str | Path, family: str):
        folder = Path(folder)
        self.model_file = folder / "tokenizer.json"
        if not self.model_file.is_file():
            raise FileNotFoundError(f"{self.model_file} not found: a {family} checkpoint needs its tokenizer.json")
        try:
            self._plain = Tokenizer.from_file(str(self.model_file))
            self._rendered = Tokenizer.from_file(str(self.model_file))
        except Exception as error:  # the Rust side raises plain Exceptions for a malformed file
            raise ValueError(f"{self.model_file} is not a valid tokenizer.json: {error}") from None
        self._plain.encode_special_tokens = True  # special strings in text stay text
        config = json_object_file(folder / "tokenizer_config.json")
        self.family = family
        self.vocab_size = self._rendered.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {token.content: i for i, token in self._rendered.get_added_tokens_decoder().items()
                               if token.special}
        self.index_special_tokens = {i: name for name, i in self.special_tokens.items()}
        self.token_strings = {key: _token_string(config[key]) for key in ("bos_token", "eos_token", "pad_token",
                                                                          "unk_token") if config.get(key)}
        self.eos_token_id = self._id_of(self.token_strings.get("eos_token", "<|endoftext|>"))
        self.pad_token_id = self._id_of(self.token_strings.get("pad_token")) or self.eos_token_id
        self.unk_token_id = self.eos_token_id
        self.gmask_token_id = self.special_tokens.get("[gMASK]")
        self.sop_token_id = self.bos_token_id = self.special_tokens.get("<sop>")
        self.mask_token_id = self.special_tokens.get("[MASK]")
        self.chat_format = TemplateFormat.for_checkpoint(folder, read_chat_template(folder, config), self)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._rendered.token_to_id(token)

    def special_id(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a special token of this tokenizer") from None

    @property
    def prefix_tokens(self) -> list[int]:
        """What GLM prompts start with: [gMASK]<sop>."""
        return [i for i in (self.gmask_token_id, self.sop_token_id) if i is not None]

    def encode_text(self, text: str) -> list[int]:
        """Ids of text, special-token strings included as ordinary text."""
        return self._plain.encode(checked_text(text), add_special_tokens=False).ids

    def encode_with_specials(self, text: str) -> list[int]:
        """Ids of a rendered chat template: special-token strings become their ids (as transformers'
        apply_chat_template tokenizes)."""
        return self._rendered.encode(checked_text(text), add_special_tokens=False).ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.encode_text(text)
        return self.prefix_tokens + ids if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._rendered.decode([checked_id(i, self.vocab_size) for i in ids],
                                     skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._rendered.id_to_token(checked_id(i, self.vocab_size)) for i in ids]

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        return [self._rendered.token_to_id(token) for token in tokens]
