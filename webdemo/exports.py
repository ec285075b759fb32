"""The page's downloadable transcripts, in folders the server names and owns.

A browser's session hash is chosen by the client, so it is only ever a dictionary key here:
each session gets a folder with a random name under one root made at start-up, and `FileRoot`
does every write and delete, refusing any path that resolves outside that root (a symlink
included). Gradio copies a returned file into its own cache before serving it, so a session's
folder only has to hold the latest pair of files; the mapping is bounded (the oldest sessions
lose their folder first) and a closed tab or `close()` deletes the folders.
"""
from __future__ import annotations

import os
import re
import secrets
import unicodedata
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

DEFAULT_STEM = "chatglm-conversation"
HTML_NAME, JSON_NAME = f"{DEFAULT_STEM}.html", f"{DEFAULT_STEM}.json"
MAX_STEM_CHARS = 60
_NOT_NAME = re.compile(r"[^\w\-]+")  # \w: letters and digits of any script, and "_"
MAX_SESSIONS = 4096  # session folders kept at once; each holds one conversation's two files


def file_stem(title: str) -> str:
    """A file name (without extension) from a conversation's title, safe on every system: only
    letters, digits, "_" and "-" (each other run becomes one "-"), no leading dot or dash, at
    most MAX_STEM_CHARS; DEFAULT_STEM when nothing is left. The title comes from the client:
    this names a file inside a server-chosen folder and is never a path."""
    text = unicodedata.normalize("NFKC", title if isinstance(title, str) else "")
    stem = _NOT_NAME.sub("-", text).strip("-_")[:MAX_STEM_CHARS].strip("-_")
    return stem or DEFAULT_STEM


class OutsideRoot(ValueError):
    """A path that would leave the root: a bug or an attack, never done."""


class FileRoot:
    """One folder that this process created; the only place where the page writes or deletes."""

    def __init__(self, prefix: str = "chatglm-webdemo-"):
        self.path = Path(tempfile.mkdtemp(prefix=prefix)).resolve()

    def inside(self, path: Path) -> Path:
        """`path` resolved (symlinks followed), or OutsideRoot unless strictly below the root."""
        resolved = Path(path).resolve()
        if resolved == self.path or not resolved.is_relative_to(self.path):
            raise OutsideRoot(f"{path} is outside {self.path}")
        return resolved

    def make_folder(self) -> Path:
        """A new folder with a random name, directly under the root."""
        folder = self.inside(self.path / secrets.token_hex(16))
        folder.mkdir(mode=0o700)
        return folder

    def write_text(self, folder: Path, name: str, text: str) -> Path:
        """Write `folder/name` whole (a reader never sees half a file); text that is not valid
        Unicode (a lone surrogate) is written with replacement characters."""
        target = self.inside(self.inside(folder) / name)
        if target.parent != self.inside(folder):
            raise OutsideRoot(f"{name!r} is not a plain file name")
        handle, staging = tempfile.mkstemp(dir=target.parent, prefix=".staging-")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(text.encode("utf-8", "replace"))
            os.replace(staging, target)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
        return target

    def remove_folder(self, folder: Path) -> None:
        shutil.rmtree(self.inside(folder), ignore_errors=True)

    def remove(self) -> None:
        """Delete the root and everything in it (at shutdown)."""
        shutil.rmtree(self.path, ignore_errors=True)


class SessionExports:
    """The latest HTML and JSON transcript of each session, in that session's random folder."""

    def __init__(self, max_sessions: int = MAX_SESSIONS):
        self.root = FileRoot()
        self._max_sessions = max_sessions
        self._folders: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()

    def write(self, session: str, html_text: str, json_text: str, title: str = "") -> tuple[Path, Path]:
        """Store this session's transcripts, named after `title` (file_stem), in place of the
        previous ones; their paths."""
        stem = file_stem(title)
        with self._lock:
            folder = self._folders.get(session)
            if folder is None:
                folder = self._folders[session] = self.root.make_folder()
                while len(self._folders) > self._max_sessions:
                    self.root.remove_folder(self._folders.popitem(last=False)[1])
            self._folders.move_to_end(session)
            written = (self.root.write_text(folder, f"{stem}.html", html_text),
                       self.root.write_text(folder, f"{stem}.json", json_text))
            for old in self.root.inside(folder).iterdir():  # the pair of an earlier title (a same name
                if old not in written and not old.name.startswith(".staging-"):  # was replaced whole)
                    self.root.inside(old).unlink(missing_ok=True)
            return written

    def forget(self, session: str) -> None:
        """The session ended: delete its folder, if it has one."""
        with self._lock:
            folder: Optional[Path] = self._folders.pop(session, None)
            if folder is not None:
                self.root.remove_folder(folder)

    def count(self) -> int:
        with self._lock:
            return len(self._folders)

    def close(self) -> None:
        with self._lock:
            self._folders.clear()
            self.root.remove()
