"""The conversations one browser keeps: a list of chats, each with its messages, its title and
its settings, and which one is open. No Gradio in it.

The whole library is one `gr.BrowserState` value, so it travels in the body of every page event
that reads it: it is capped (count, and bytes as the browser's JSON has them) well under the
server's body limit, and everything in it is read as hostile input (`read_library`), like any
other value a client sends.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .conversation import clean_history

MAX_CONVERSATIONS = 20
MAX_TITLE_CHARS = 60
TITLE_FROM_MESSAGE_CHARS = 40  # a default title: the start of the first message
# The library's JSON may use 3/8 of the body limit: sealed (sealed_store.py: compressed, then base64,
# at most 4/3 of that) it takes at most half of a request, and a message and a system prompt fit beside it.
STORE_SHARE_OF_BODY = 3 / 8
ANSWER_RESERVE_BYTES = 64 << 10  # room an answer needs: a new one starts only with this much left
SETTING_NAMES = ("max_length", "top_p", "temperature", "system")
_CHAT_ID = re.compile(r"[0-9a-f]{16}")
LIBRARY_FIELDS = {"version": int, "current": str, "chats": list}  # what Library.to_value writes...
CHAT_FIELDS = {"id": str, "title": str, "auto_title": str, "settings": dict, "messages": list}  # ...and Chat.to_value


class LibraryInvalid(ValueError):
    """A stored library whose shape is not the one this page writes (altered, or not ours)."""


def _new_id() -> str:
    return secrets.token_hex(8)


def json_bytes(value: Any) -> int:
    """The size of `value` as the browser sends it back (compact JSON, UTF-8)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))


def store_limit(max_body_bytes: int) -> int:
    """Bytes the library may take in the browser, from the server's body limit."""
    return int(max_body_bytes * STORE_SHARE_OF_BODY)


def one_line(text: str, limit: int) -> str:
    """Whitespace collapsed, cut to `limit` characters (with an ellipsis)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


@dataclass
class Chat:
    """One conversation. title is the user's name for it; auto_title the model's (chat_titles.py);
    with neither it is named after its first message. cut: older messages were left unread (more
    than the limits allow), not stored."""

    id: str
    messages: list[dict] = field(default_factory=list)
    title: str = ""
    settings: dict = field(default_factory=dict)
    cut: bool = False
    auto_title: str = ""

    def shown_title(self, untitled: str) -> str:
        if self.title or self.auto_title:
            return self.title or self.auto_title
        return one_line(self.messages[0]["content"], TITLE_FROM_MESSAGE_CHARS) if self.messages else untitled

    def to_value(self) -> dict:
        value = {"id": self.id, "title": self.title, "settings": self.settings, "messages": self.messages}
        return {**value, "auto_title": self.auto_title} if self.auto_title else value


@dataclass
class Library:
    """The chats, newest first, and the id of the open one (always one of them)."""

    chats: list[Chat]
    current_id: str

    @property
    def current(self) -> Chat:
        return next(chat for chat in self.chats if chat.id == self.current_id)

    def to_value(self) -> dict:
        return {"version": 1, "current": self.current_id, "chats": [chat.to_value() for chat in self.chats]}

    def size(self) -> int:
        return json_bytes(self.to_value())

    def choices(self, untitled: str) -> list[tuple[str, str]]:
        """(title, id) pairs for the conversation list."""
        return [(chat.shown_title(untitled), chat.id) for chat in self.chats]

    def add(self, chat: Chat) -> None:
        """Open `chat` as the newest conversation (ValueError beyond MAX_CONVERSATIONS)."""
        if len(self.chats) >= MAX_CONVERSATIONS:
            raise ValueError(f"at most {MAX_CONVERSATIONS} conversations")
        self.chats.insert(0, chat)
        self.current_id = chat.id

    def full(self) -> bool:
        return len(self.chats) >= MAX_CONVERSATIONS

    def _blank(self) -> Optional[Chat]:
        """An empty chat the user has not named, if there is one (the open one first)."""
        return next((chat for chat in [self.current, *self.chats] if not chat.messages and not chat.title), None)

    def can_start_chat(self) -> bool:
        return not self.full() or self._blank() is not None

    def new_chat(self, settings: dict) -> bool:
        """Open an empty chat with `settings`, newest first: one that is empty and unnamed already
        (a chat the user named is kept as it is), else a new one. False (nothing changes) at
        MAX_CONVERSATIONS."""
        blank = self._blank()
        if blank is None and self.full():
            return False
        if blank is not None:
            self.chats.remove(blank)
        self.add(blank or Chat(_new_id()))
        self.current.settings = settings
        return True

    def switch(self, chat_id: Any) -> bool:
        """Open the chat with this id; False (nothing changes) if there is none."""
        if not any(chat.id == chat_id for chat in self.chats):
            return False
        self.current_id = chat_id
        return True

    def rename(self, title: Any) -> None:
        self.current.title = one_line(title, MAX_TITLE_CHARS) if isinstance(title, str) else ""

    def delete(self, settings: dict) -> tuple[int, Chat, Optional[str]]:
        """Delete the open chat and open the newest one left (or a new empty one); where it was,
        the chat and the id of the empty one made in its place (or None), for `undelete`."""
        index = next(i for i, chat in enumerate(self.chats) if chat.id == self.current_id)
        removed, placeholder = self.chats.pop(index), None
        if not self.chats:
            self.chats = [Chat(_new_id(), settings=settings)]
            placeholder = self.chats[0].id
        self.current_id = self.chats[0].id
        return index, removed, placeholder

    def undelete(self, index: int, chat: Chat, placeholder: Optional[str] = None) -> bool:
        """Put a deleted chat back where it was and open it (the empty chat made in its place
        goes, unless it was used since); False (nothing changes) when its place is taken (the
        library is full, or a chat has its id)."""
        if any(other.id == chat.id for other in self.chats):
            return False
        kept = [other for other in self.chats if other.id != placeholder or other.messages or other.title]
        if len(kept) >= MAX_CONVERSATIONS:
            return False
        self.chats = kept
        self.chats.insert(min(index, len(self.chats)), chat)
        self.current_id = chat.id
        return True

    def matching(self, query: Any, untitled: str) -> list[tuple[str, str]]:
        """`choices` whose shown title holds `query` (case-folded); all of them for no query."""
        words = query.casefold().strip() if isinstance(query, str) else ""
        return [(title, chat_id) for title, chat_id in self.choices(untitled) if words in title.casefold()]


def empty_library(settings: dict) -> Library:
    chat = Chat(_new_id(), settings=settings)
    return Library([chat], chat.id)


def imported_chat(messages: list[dict], settings: dict) -> Chat:
    return Chat(_new_id(), messages=messages, settings=settings)


def _check_fields(value: Any, fields: dict, what: str) -> None:
    if not isinstance(value, dict):
        raise LibraryInvalid(f"{what} is not an object")
    for name, item in value.items():
        kind = fields.get(name)
        if kind is None or not isinstance(item, kind) or isinstance(item, bool):
            raise LibraryInvalid(f"{what} has an unexpected field {name[:40]!r}" if kind is None
                                 else f"{what}'s {name!r} is not of type {kind.__name__}")


def read_library(value: Any, *, max_messages: int, max_chars: int, defaults: dict,
                 settings_valid: Callable[[dict], bool]) -> Library:
    """The library a browser sent: None (a new browser) is an empty one; a bare message list
    (what the page kept before it had many conversations) is one chat; anything else must have
    the shape Library.to_value writes, every field of its type, or LibraryInvalid is raised.
    Within that shape, what is malformed is dropped or replaced: at most MAX_CONVERSATIONS
    chats, each read with `clean_history` (at most max_messages items), ids the server's own
    shape, titles and system prompts cut to size, settings that `settings_valid` refuses
    replaced by `defaults`. Cost: one pass over what is read."""
    if value is None:
        return empty_library(dict(defaults))
    if isinstance(value, list):
        value = {"chats": [{"messages": value}]}
    _check_fields(value, LIBRARY_FIELDS, "the library")
    for index, item in enumerate(value.get("chats", [])[:MAX_CONVERSATIONS]):
        _check_fields(item, CHAT_FIELDS, f"conversation {index}")
    chats, seen = [], set()
    for item in value.get("chats", [])[:MAX_CONVERSATIONS]:
        chat_id = item.get("id")
        if not isinstance(chat_id, str) or not _CHAT_ID.fullmatch(chat_id) or chat_id in seen:
            chat_id = _new_id()
        seen.add(chat_id)
        title, auto_title, messages = item.get("title"), item.get("auto_title"), item.get("messages")
        chats.append(Chat(chat_id, clean_history(messages, max_messages),
                          one_line(title, MAX_TITLE_CHARS) if isinstance(title, str) else "",
                          _read_settings(item.get("settings"), max_chars, defaults, settings_valid),
                          cut=isinstance(messages, list) and len(messages) > max_messages,
                          auto_title=one_line(auto_title, MAX_TITLE_CHARS) if isinstance(auto_title, str) else ""))
    if not chats:
        return empty_library(dict(defaults))
    current = value.get("current")
    return Library(chats, current if current in seen else chats[0].id)


def _read_settings(value: Any, max_chars: int, defaults: dict, valid: Callable[[dict], bool]) -> dict:
    if not isinstance(value, dict):
        return dict(defaults)
    settings = {name: value.get(name, defaults[name]) for name in SETTING_NAMES}
    if not isinstance(settings["system"], str) or len(settings["system"]) > max_chars or not valid(settings):
        return dict(defaults)
    return settings


def room_left(library: Library, limit: int, extra: Optional[str] = None) -> int:
    """Bytes left under `limit` once `extra` (a message about to be added) is stored too."""
    return limit - library.size() - (json_bytes(extra) + 40 if extra is not None else 0)
