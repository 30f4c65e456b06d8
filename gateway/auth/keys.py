"""Caller keys: made once by `embedding-gateway keys new`, configured by their SHA-256 only, presented as
`Authorization: Bearer <key>` (or `api-key: <key>`), and never written anywhere by the gateway.

A key is looked up by its digest and then compared in constant time; the lookup reveals nothing about
the key itself (finding a key from its digest is what SHA-256 makes infeasible).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from urllib.parse import parse_qsl

from config.auth import KeyConfig
from gateway.errors import AmbiguousCredentials, Unauthenticated

PREFIX = "egk_"  # recognisable in secret scanners and in a user's clipboard
MAX_KEY_CHARS = 256
_URL_KEY_PARAMS = frozenset({"api_key", "api-key", "apikey", "key", "access_token", "token"})


def new_key() -> str:
    """A fresh key: the prefix and 192 random bits."""
    return PREFIX + secrets.token_urlsafe(24)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, keys: Iterable[KeyConfig]) -> None:
        self._by_digest = {k.hash: k for k in keys}

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]], query: bytes) -> KeyConfig:
        """The caller's key entry, or Unauthenticated with a message the caller can act on."""
        if query and _URL_KEY_PARAMS & {name.lower() for name, _ in parse_qsl(query.decode("latin-1"), True)}:
            raise Unauthenticated(
                "API keys are not accepted in the URL (URLs end up in logs and proxies); "
                "send `Authorization: Bearer <key>`"
            )
        bearer = [value for name, value in headers if name == b"authorization"]
        api_key = [value.strip() for name, value in headers if name == b"api-key"]
        if len(bearer) > 1 or len(api_key) > 1:
            raise AmbiguousCredentials(
                "more than one Authorization or api-key header: send the key once, as `Authorization: Bearer <key>`"
            )
        token = api_key[0] if api_key else None
        if bearer:
            scheme, _, rest = bearer[0].partition(b" ")
            if scheme.lower() != b"bearer" or not rest.strip():
                raise Unauthenticated("malformed Authorization header: send `Authorization: Bearer <key>`")
            if token is not None and token != rest.strip():  # which one counts would be a guess
                raise AmbiguousCredentials(
                    "the Authorization and api-key headers carry different keys: send one of them"
                )
            token = rest.strip()
        if token is None:
            raise Unauthenticated("this gateway needs an API key: send `Authorization: Bearer <key>`")
        if len(token) > MAX_KEY_CHARS or not _printable(token):
            raise Unauthenticated("invalid API key")
        presented = hashlib.sha256(token).hexdigest()
        found = self._by_digest.get(presented)
        if found is None or not hmac.compare_digest(found.hash, presented):
            raise Unauthenticated("invalid API key")
        return found


def _printable(token: bytes) -> bool:
    return all(33 <= b < 127 for b in token)
