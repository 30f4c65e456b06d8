"""Every route the gateway serves, declared once.

Each entry names a handler (whose decorator gives the path and methods), who may call it (`Access`) and the
dialect its errors are written in. The Litestar app, the embedding routes served straight from ASGI, the
guard, error bodies, request metric labels and the OpenAPI document are all derived from this table; a path
it does not hold is a 404 before anything else runs, and `create_app` refuses to start when Litestar would
serve a route the table does not know. So a new route cannot be served without an access class.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from litestar.handlers import HTTPRouteHandler

from gateway.api import cohere, consistency, ops, schema
from gateway.api import openai as openai_dialect
from gateway.api import tei as tei_dialect
from gateway.api.errors import Dialect
from gateway.auth.guard import Access
from gateway.pipeline import EmbedRequest
from gateway.runtime import Runtime
from gateway.service import EmbedResult

Parse = Callable[[bytes, Runtime], EmbedRequest]
Render = Callable[[EmbedResult, EmbedRequest], bytes]
Direct = tuple[Parse, Render]


@dataclass(frozen=True, slots=True)
class Entry:
    """One path and method set with one access class. `handler`: the Litestar handler that serves it, or
    only describes it in OpenAPI when `direct` serves it; None for Litestar's own OpenAPI routes."""

    path: str
    methods: frozenset[str]
    access: Access
    dialect: Dialect = Dialect.OPENAI
    handler: HTTPRouteHandler | None = None
    direct: Direct | None = None


def of(
    handler: HTTPRouteHandler, access: Access, dialect: Dialect = Dialect.OPENAI, direct: Direct | None = None
) -> Entry:
    (path,) = handler.paths
    return Entry(path, frozenset(handler.http_methods) - {"OPTIONS"}, access, dialect, handler, direct)


_OPENAI: Direct = (openai_dialect.parse, openai_dialect.render)
_TEI: Direct = (tei_dialect.parse, tei_dialect.render)
_COHERE_V2: Direct = (cohere.parse_v2, cohere.render)
_COHERE_V1: Direct = (cohere.parse_v1, cohere.render)

ENTRIES: tuple[Entry, ...] = (
    # Embeddings: a key (when auth is on), served straight from ASGI (gateway.api.direct).
    of(schema.openai_embeddings, Access.KEY, direct=_OPENAI),
    of(schema.openai_embeddings_unversioned, Access.KEY, direct=_OPENAI),
    of(schema.cohere_v2, Access.KEY, Dialect.COHERE, _COHERE_V2),
    of(schema.cohere_v1, Access.KEY, Dialect.COHERE, _COHERE_V1),
    of(schema.tei_embed, Access.KEY, Dialect.TEI, _TEI),
    of(schema.tei_root, Access.KEY, Dialect.TEI, _TEI),
    of(schema.tei_invocations, Access.KEY, Dialect.TEI, _TEI),
    # Probes stay open: load balancers and orchestrators carry no key.
    of(ops.health, Access.OPEN),
    of(ops.ready, Access.OPEN),
    of(ops.metrics, Access.METRICS),
    # Read-only views: open unless auth.protect_views.
    of(ops.models, Access.VIEW),
    of(ops.model, Access.VIEW),
    of(ops.backends, Access.VIEW),
    of(ops.info, Access.VIEW, Dialect.TEI),
    of(ops.dashboard, Access.VIEW),
    of(consistency.last_reports, Access.VIEW),
    Entry("/schema", frozenset({"GET"}), Access.VIEW),
    Entry("/schema/openapi.json", frozenset({"GET"}), Access.VIEW),
    Entry("/schema/openapi.yaml", frozenset({"GET"}), Access.VIEW),
    Entry("/schema/openapi.yml", frozenset({"GET"}), Access.VIEW),
    # Admin: change or reveal the whole gateway.
    of(consistency.check_now, Access.ADMIN),
    of(ops.usage, Access.ADMIN),
    of(ops.reload, Access.ADMIN),
)

# Litestar's catch-all for OpenAPI render plugins that are not enabled: the table never lets a request reach it.
UNSERVED = frozenset({"/schema/{path:str}"})

_TEI_PREFIXES = ("/embed", "/invocations", "/info")


@dataclass(frozen=True, slots=True)
class Route:
    """Everything under one path: the access class of each method, the dialect, the direct handler."""

    path: str  # as declared (a template for /v1/models/{model_id:str}): also the metric label
    dialect: Dialect
    methods: Mapping[str, Access]  # HEAD is GET without a body, so it is not listed
    direct: Direct | None = None
    strictest: Access = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "strictest", max(self.methods.values(), key=lambda a: a.rank))

    def access(self, method: str) -> Access:
        """The access class of `method`; for a method the route does not take, its strictest one, so a
        caller learns nothing about an admin route (not even its methods) without an admin key."""
        return self.methods.get(method, self.strictest)


def _template(path: str) -> re.Pattern[str]:
    """`/v1/models/{model_id:str}` -> one path segment where the parameter stands."""
    return re.compile("^" + "[^/]+".join(re.escape(part) for part in re.split(r"\{[^}]+\}", path)) + "$")


class RouteTable:
    def __init__(self, entries: Iterable[Entry]) -> None:
        self.entries = tuple(entries)
        grouped: dict[str, list[Entry]] = {}
        for entry in self.entries:
            grouped.setdefault(entry.path, []).append(entry)
        self.routes: list[Route] = []
        for path, group in grouped.items():
            dialects = {e.dialect for e in group}
            directs = {e.direct for e in group if e.direct is not None}
            assert len(dialects) == 1 and len(directs) <= 1, f"route {path}: one dialect and one direct handler"
            methods = {m: e.access for e in group for m in e.methods}
            self.routes.append(Route(path, dialects.pop(), methods, directs.pop() if directs else None))
        self._exact = {r.path: r for r in self.routes if "{" not in r.path}
        self._templates = [(_template(r.path), r) for r in self.routes if "{" in r.path]
        self.handlers = [e.handler for e in self.entries if e.handler is not None]

    def match(self, path: str) -> Route | None:
        """The route for an already normalised path; None: not served."""
        route = self._exact.get(path)
        if route is not None:
            return route
        return next((r for pattern, r in self._templates if pattern.match(path)), None)

    def normalize(self, path: str) -> str:
        """One spelling per route, so the guard and the router can never see different paths: `/x/`, `//x`,
        `/a/./b`, `/a//b`, `;params`, and an absolute-form target's scheme and host all reduce to `/x`."""
        if path in self._exact:  # the common case: already canonical
            return path
        if path.startswith(("http://", "https://")):  # absolute-form request target (RFC 9112 3.2.2)
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        segments: list[str] = []
        for raw in path.split("/"):
            segment = raw.split(";", 1)[0]  # path parameters (RFC 3986 3.3) name no resource here
            if segment in ("", "."):
                continue
            if segment == "..":
                if segments:
                    segments.pop()
                continue
            segments.append(segment)
        return "/" + "/".join(segments)

    def check_served(self, litestar_routes: Iterable[Any]) -> None:
        """Refuse to start when Litestar would serve a path or method that has no entry (no access class)."""
        for route in litestar_routes:
            if route.path in UNSERVED:
                continue
            known = next((r for r in self.routes if r.path == route.path), None)
            missing = set(route.methods) - {"OPTIONS", "HEAD"} - set(known.methods if known else ())
            if missing:
                raise RuntimeError(f"route {route.path} {sorted(missing)} has no entry in gateway/api/routes.py")

    def embedding_paths(self) -> list[str]:
        return [f"POST {r.path}" for r in self.routes if r.direct is not None]


def dialect_for_unknown(path: str) -> Dialect:
    """The dialect a path's prefix suggests, for a 404 on a path the table does not hold."""
    if path.startswith(_TEI_PREFIXES) and not path.startswith("/embeddings"):
        return Dialect.TEI
    return Dialect.COHERE if path.startswith("/v2/") else Dialect.OPENAI


TABLE = RouteTable(ENTRIES)
