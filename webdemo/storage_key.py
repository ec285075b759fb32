"""The key that encrypts each browser's stored conversation (`gr.BrowserState`).

It must not be a constant in the source (anyone could read it), and it should survive a
restart so that chats kept in browsers stay readable: so it is random, made once, and kept in
the user's cache folder with owner-only permissions, unless CHATGLM_STORAGE_SECRET gives one.
"""
from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path
from typing import Mapping, Optional

ENV_SECRET = "CHATGLM_STORAGE_SECRET"
MIN_SECRET_CHARS = 16

log = logging.getLogger(__name__)


def secret_file(environ: Mapping[str, str] = os.environ) -> Path:
    """$XDG_CACHE_HOME/chatglm-webdemo/storage-secret (~/.cache by default)."""
    cache = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "chatglm-webdemo" / "storage-secret"


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
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=".storage-secret-")  # mode 0600
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


def storage_secret(environ: Mapping[str, str] = os.environ) -> str:
    """CHATGLM_STORAGE_SECRET, else the kept secret (made on first use). Where the cache folder
    cannot be written, a random secret for this process: stored chats then end with it."""
    given = environ.get(ENV_SECRET)
    if given:
        return given
    path = secret_file(environ)
    try:
        return _read(path) or _create(path)
    except OSError as error:
        log.warning("cannot keep the browser-storage secret in %s (%s): stored chats will not "
                    "survive a restart; set %s to keep them", path, error, ENV_SECRET)
        return secrets.token_urlsafe(32)
