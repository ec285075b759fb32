"""The two secrets of the conversations kept in browsers, each random, made once and kept in
the user's cache folder with owner-only permissions (so that kept chats survive a restart),
unless an environment variable gives it:

- the sealing key (`sealing_secret`, CHATGLM_CHAT_KEY, file `chat-key`): the server encrypts and
  authenticates each browser's library with it (sealed_store.py); it never leaves the server.
  Replacing it (a new value, or deleting the file) makes every kept library unreadable: each
  browser then starts a new one, with a message saying so;
- Gradio's BrowserState wrapper (`storage_secret`, CHATGLM_STORAGE_SECRET, file
  `storage-secret`): Gradio serves it to every visitor in /config and encrypts in the browser
  with it, so it protects nothing; it is kept only so that libraries stored before the sealing
  key existed can still be read once (and sealed from then on).
"""
from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path
from typing import Mapping, Optional

ENV_SECRET = "CHATGLM_STORAGE_SECRET"
ENV_SEALING_KEY = "CHATGLM_CHAT_KEY"
MIN_SECRET_CHARS = 16

log = logging.getLogger(__name__)


def secret_file(environ: Mapping[str, str] = os.environ, name: str = "storage-secret") -> Path:
    """$XDG_CACHE_HOME/chatglm-webdemo/NAME (~/.cache by default)."""
    cache = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "chatglm-webdemo" / name


def _read(path: Path) -> Optional[str]:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return value if len(value) >= MIN_SECRET_CHARS else None


def _create(path: Path) -> str:
    """Write a new secret unless another process got there first; the one that is kept."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")  # mode 0600
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(value + "\n")
        if _read(path) is None and path.exists():  # empty or damaged: replace it
            os.replace(staging, path)
        else:
            try:
                os.link(staging, path)  # atomic, and fails if a concurrent start made one
            except FileExistsError:
                pass
    finally:
        Path(staging).unlink(missing_ok=True)
    return _read(path) or value


def kept_secret(environ: Mapping[str, str], env_var: str, name: str) -> str:
    """environ[env_var], else the secret kept in secret_file(name) (made on first use). Where the
    cache folder cannot be written, a random secret for this process: stored chats then end with it."""
    given = environ.get(env_var)
    if given:
        return given
    path = secret_file(environ, name)
    try:
        return _read(path) or _create(path)
    except OSError as error:
        log.warning("cannot keep a secret in %s (%s): stored chats will not survive a restart; set %s to "
                    "keep them", path, error, env_var)
        return secrets.token_urlsafe(32)


def storage_secret(environ: Mapping[str, str] = os.environ) -> str:
    """Gradio's BrowserState wrapper (public: see above)."""
    return kept_secret(environ, ENV_SECRET, "storage-secret")


def sealing_secret(environ: Mapping[str, str] = os.environ) -> str:
    """The key material of sealed_store.StoreSeal (never sent to a client)."""
    return kept_secret(environ, ENV_SEALING_KEY, "chat-key")
