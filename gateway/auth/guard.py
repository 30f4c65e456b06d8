"""Who may call what, run once per request before any route code. The access class of every route comes
from the route table (`gateway/api/routes.py`); this module only decides what each class asks of a caller:

- OPEN (`/health`, `/ready`): nothing;
- KEY (the embedding routes): a valid key (and, once the body is parsed, one that may use the model);
- ADMIN (`POST /v1/consistency`, `POST /v1/reload`, `GET /v1/usage`): an admin key;
- VIEW (read-only `/v1/*` views, `/info`, `/dashboard`, `/schema`) and METRICS (`/metrics`): open unless
  `protect_views` / `protect_metrics` make them KEY.
A path the table does not hold never gets here: it is a 404.
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


class Access(Enum):
    OPEN = "open"
    VIEW = "view"
    METRICS = "metrics"
    KEY = "key"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Access.OPEN: 0, Access.VIEW: 1, Access.METRICS: 1, Access.KEY: 2, Access.ADMIN: 3}


class Guard:
    def __init__(self, settings: AuthSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.enabled = settings.enabled
        self._ring = KeyRing(settings.keys)
        self._metrics = metrics

    def effective(self, access: Access) -> Access:
        """What the route's class asks for with this configuration: OPEN, KEY or ADMIN."""
        if not self.enabled:
            return Access.OPEN
        if access is Access.VIEW:
            return Access.KEY if self.settings.protect_views else Access.OPEN
        if access is Access.METRICS:
            return Access.KEY if self.settings.protect_metrics else Access.OPEN
        return access

    def check(
        self, route_access: Access, method: str, path: str, headers: list[tuple[bytes, bytes]], query: bytes
    ) -> KeyConfig | None:
        """The caller's key for a route that needs one (None for open routes); 401/403 otherwise."""
        access = self.effective(route_access)
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
