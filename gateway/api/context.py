"""Outermost ASGI layer: x-request-id on every response (errors included) and request metrics.

It wraps the Litestar app rather than sitting inside it, so responses produced by exception
handlers and router-level 404/405s carry the header too.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.metrics import Metrics

_HEADER = b"x-request-id"
_KNOWN_ROUTES = {
    "/v1/embeddings",
    "/embed",
    "/v1/models",
    "/v1/backends",
    "/v1/consistency",
    "/health",
    "/ready",
    "/metrics",
}


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    def __getattr__(self, name: str) -> Any:  # expose the wrapped app's attributes (state, routes...)
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # type: ignore[comparison-overlap]  # lifespan arrives here too
            await self.app(scope, receive, send)
            return
        request_id = next((v for k, v in scope["headers"] if k == _HEADER), b"")[:128]
        if not request_id:
            request_id = uuid.uuid4().hex.encode()
            scope["headers"] = [*scope["headers"], (_HEADER, request_id)]
        route = scope["path"] if scope["path"] in _KNOWN_ROUTES else "other"
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (_HEADER, request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
