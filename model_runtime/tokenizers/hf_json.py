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
from .special_tokens import SpecialTokens, checked_text


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


class JSONTokenizer(SpecialTokens):
    """Text <-> ids with a checkpoint's tokenizer.json, and its chat template as `chat_format`.
    Offers the calls the shared code uses on the other tokenizers (encode, decode, vocab_size,
    special_id, prefix_tokens, eos/pad ids); the special tokens are the file's, wherever their
    ids are."""

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

    def encode_text(self, text: str) -> list[int]:
        """Ids of text, special-token strings included as ordinary text."""
        return self._plain.encode(checked_text(text), add_special_tokens=False).ids

    def encode_with_specials(self, text: str) -> list[int]:
        """Ids of a rendered chat template: special-token strings become their ids (as transformers'
        apply_chat_template tokenizes)."""
        return self._rendered.encode(checked_text(text), add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._rendered.decode(list(map(self._checked, ids)), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._rendered.id_to_token(i) for i in map(self._checked, ids)]

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        return [self._rendered.token_to_id(token) for token in tokens]
