"""Outermost ASGI layer: the path normalised once and looked up in the route table (404 for what it does
not hold), the guard, x-request-id on every response (errors included), the request id in every log line,
request metrics, HEAD on every GET route, and a 503 in the client's dialect for a request cut off by
shutdown.

It wraps the Litestar app rather than sitting inside it, so responses produced by exception
handlers and router-level 404/405s carry the header too.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from litestar.datastructures import State
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api import errors
from gateway.api.direct import EmbeddingRoutes, respond_error
from gateway.api.routes import TABLE, Route, dialect_for_unknown
from gateway.auth.guard import CALLER
from gateway.errors import GatewayError, MethodNotAllowed, RouteNotFound, ShuttingDown
from gateway.logs import ACCESS, REQUEST_ID, REQUEST_INFO
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

_HEADER = b"x-request-id"


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics, direct: EmbeddingRoutes, state: State) -> None:
        self.app = app
        self.metrics = metrics
        self.direct = direct  # the embedding routes, served without Litestar
        self._state = state  # state.runtime: the current runtime (a reload swaps it)
        # JSON logs get an access line per request; people reading text logs get metrics instead.
        self._access = state.runtime.settings.server.log_format == "json"

    def __getattr__(self, name: str) -> Any:  # expose the wrapped app's attributes (state, routes...)
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # type: ignore[comparison-overlap]  # lifespan arrives here too
            await self.app(scope, receive, send)
            return
        request_id = next((v for k, v in scope["headers"] if k == _HEADER), b"")[:128]
        if not request_id:
            # 128 random bits, unique like uuid4; ids need no secrecy, so no syscall per request.
            request_id = b"%032x" % random.getrandbits(128)
            scope["headers"] = [*scope["headers"], (_HEADER, request_id)]
        REQUEST_ID.set(request_id.decode("latin-1"))
        REQUEST_INFO.set(None)
        head = scope.get("method") == "HEAD"
        if head:  # HEAD is GET without a body (load balancers probe /health and /ready this way)
            scope = {**scope, "method": "GET"}  # type: ignore[assignment]
        path = TABLE.normalize(scope["path"])
        if path != scope["path"]:  # everything after this layer (guard, router, Litestar) sees one spelling
            scope = {**scope, "path": path, "raw_path": path.encode()}  # type: ignore[assignment]
        route: Route | None = TABLE.match(path)
        dialect = route.dialect if route is not None else dialect_for_unknown(path)
        scope[errors.SCOPE_DIALECT] = dialect  # type: ignore[literal-required]
        method = str(scope.get("method", ""))
        started = time.perf_counter()
        status = 0
        caller = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (_HEADER, request_id)]
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            try:
                if route is None:
                    raise RouteNotFound(
                        f"no route {path}; the embedding routes are {', '.join(TABLE.embedding_paths())}, and "
                        "GET /schema/openapi.json lists every route"
                    )
                guard = self._state.runtime.guard
                if guard.enabled:  # 401 / 403 before any route code, also for a method the route lacks
                    caller = guard.check(route.access(method), method, path, scope["headers"], scope["query_string"])
                    CALLER.set(caller)
                if method not in route.methods:
                    allow = ", ".join(sorted({*route.methods, *(["HEAD"] if "GET" in route.methods else [])}))
                    raise MethodNotAllowed(f"{path} takes {allow}, not {method}", allow=allow)
            except GatewayError as exc:  # in the route's dialect
                await respond_error(send_with_id, method, path, dialect, exc)
                return
            if route.direct is not None:
                await self.direct(scope, receive, send_with_id, route.direct, dialect)
            else:
                await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # The server cancels requests that outlive the shutdown grace: answer them properly.
            if status:
                raise
            log.warning("request cut off by shutdown after %.1fs: answered 503", time.perf_counter() - started)
            problem = errors.classify(ShuttingDown("the gateway is shutting down; retry", retry_after=1))
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            headers += [(k.lower().encode(), v.encode()) for k, v in (problem.headers or {}).items()]
            start: Any = {"type": "http.response.start", "status": problem.status, "headers": headers}
            body = errors.render(dialect, problem)
            await send_with_id(start)
            await send_with_id({"type": "http.response.body", "body": body, "more_body": False})
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.request_done(route.path if route is not None else "other", status or 500, elapsed)
            if caller is not None:
                self.metrics.key_request(caller.name, status or 500)
            if self._access:
                info = REQUEST_INFO.get() or {}
                extra = {"route": path, "method": method, "status": status or 500}
                extra |= {"latency_ms": round(elapsed * 1000, 3), "key": caller.name if caller else None, **info}
                ACCESS.info("%s %s %s", method, path, status or 500, extra=extra)
