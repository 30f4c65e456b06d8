"""Who may call what: the route policy, run once per request before any route code.

- the embedding routes need a valid key (and, once the body is parsed, one that may use the model);
- admin routes (`POST /v1/consistency`, `POST /v1/reload`, `GET /v1/usage`) need an admin key;
- `/health`, `/ready` stay open for probes; `/metrics` and the read-only `/v1/*` views are open unless
  `protect_metrics` / `protect_views` say otherwise.
"""

from __future__ import annotations

from contextvars import ContextVar
from enum import Enum

from config.auth import AuthSettings, KeyConfig
from gateway.auth.keys import KeyRing
from gateway.errors import Forbidden, ModelNotFound, Unauthenticated
from gateway.metrics import Metrics

# The caller of the request being handled (None: auth off, or an open route).
CALLER: ContextVar[KeyConfig | None] = ContextVar("caller", default=None)

EMBEDDING_ROUTES = frozenset({"/v1/embeddings", "/embed", "/", "/invocations"})
ADMIN_ROUTES = frozenset({("POST", "/v1/consistency"), ("POST", "/v1/reload"), ("GET", "/v1/usage")})


class Access(Enum):
    OPEN = "open"
    KEY = "key"
    ADMIN = "admin"


class Guard:
    def __init__(self, settings: AuthSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.enabled = settings.enabled
        self._ring = KeyRing(settings.keys)
        self._metrics = metrics

    def access(self, method: str, path: str) -> Access:
        if not self.enabled:
            return Access.OPEN
        if path in EMBEDDING_ROUTES:
            return Access.KEY
        if (method, path) in ADMIN_ROUTES:
            return Access.ADMIN
        if path == "/metrics":
            return Access.KEY if self.settings.protect_metrics else Access.OPEN
        if path.startswith("/v1/") or path in ("/info", "/dashboard"):
            return Access.KEY if self.settings.protect_views else Access.OPEN
        return Access.OPEN

    def check(self, method: str, path: str, headers: list[tuple[bytes, bytes]], query: bytes) -> KeyConfig | None:
        """The caller's key for a route that needs one (None for open routes); 401/403 otherwise."""
        access = self.access(method, path)
        if access is Access.OPEN:
            return None
        try:
            key = self._ring.authenticate(headers, query)
        except Unauthenticated:
            self._metrics.key_rejection("-", "invalid_key")
            raise
        if access is Access.ADMIN and not key.admin:
            self._metrics.key_rejection(key.name, "admin_required")
            raise Forbidden(f"key {key.name!r} may not call {method} {path}: it needs an admin key")
        return key

    def allow_model(self, key: KeyConfig | None, model: str, known: bool) -> None:
        """404 in OpenAI's words for a model the key may not use - the same as for one that does not
        exist, so a key never learns which other models there are."""
        if key is None or (known and key.may_use(model)):
            return
        self._metrics.key_rejection(key.name, "model_not_allowed")
        raise ModelNotFound(f"The model `{model}` does not exist or you do not have access to it.", param="model")
