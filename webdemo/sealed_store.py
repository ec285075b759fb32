"""The conversations a browser keeps, sealed by the server: the browser holds an opaque token
that only this server can read.

Gradio's BrowserState encrypts in the browser with a secret it serves to every visitor, so it
hides nothing. The page therefore keeps `StoreSeal.seal(library)` instead: the library's JSON,
compressed, then encrypted and authenticated with AES-256-GCM (the `cryptography` package)
under a key derived from storage_key.sealing_secret, which never leaves the server. A copied
blob is unreadable without the server; an altered one fails authentication; after the key is
replaced, every old blob is a clean `StoreUnreadable` (the page then starts a new library and
says so). Whoever holds a token and can reach the server can still open it there: it is a
bearer value, like a cookie, and `--auth` keeps strangers from presenting one.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import zlib
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TOKEN_PREFIX = "sealed-v1."
_PURPOSE = b"chatglm-webdemo: conversations kept in browsers, v1"
_NONCE_BYTES = 12


class StoreUnreadable(ValueError):
    """A token this server cannot open: another key, altered, cut, or not a token at all."""


class StoreSeal:
    def __init__(self, secret: str):
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_PURPOSE).derive(secret.encode("utf-8"))
        self._aead = AESGCM(key)

    def seal(self, value: Any) -> str:
        data = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
        nonce = os.urandom(_NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, zlib.compress(data, 6), _PURPOSE)
        return TOKEN_PREFIX + base64.urlsafe_b64encode(sealed).decode("ascii")

    def open(self, token: str, max_bytes: int) -> Any:
        """The value sealed in `token` (at most max_bytes of JSON), or StoreUnreadable."""
        if not token.startswith(TOKEN_PREFIX):
            raise StoreUnreadable("not a sealed library")
        try:
            sealed = base64.urlsafe_b64decode(token[len(TOKEN_PREFIX):].encode("ascii"))
            packed = self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], _PURPOSE)
        except (UnicodeEncodeError, binascii.Error, ValueError, InvalidTag):
            raise StoreUnreadable("sealed with another key, or altered") from None
        inflate = zlib.decompressobj()
        try:
            data = inflate.decompress(packed, max_bytes + 1)
        except zlib.error:
            raise StoreUnreadable("damaged") from None
        if len(data) > max_bytes or inflate.unconsumed_tail:
            raise StoreUnreadable(f"larger than {max_bytes} bytes")
        try:
            return json.loads(data.decode("utf-8", "surrogatepass"))
        except ValueError:
            raise StoreUnreadable("not JSON") from None
