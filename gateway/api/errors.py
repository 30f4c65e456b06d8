"""The one exception handler: every error class → status code + the client's dialect.

`/v1/*` answers in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; `/embed` in TEI's
`{"error", "error_type"}`. No traceback ever reaches a client; unexpected errors are logged here.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from backends.errors import BackendError, InputRejected, InputTooLong
from gateway.errors import REDUCE_PHRASE, GatewayError, NoBackendAvailable, RateLimited, Unauthenticated

log = logging.getLogger(__name__)

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    429: "rate_limit_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    503: "service_unavailable",
    504: "timeout",
    500: "server_error",
}
_TEI_TYPES = {
    400: "Validation",
    401: "Unauthorized",
    403: "Unauthorized",
    404: "Validation",
    405: "Validation",
    413: "Validation",
    415: "Validation",
    429: "Overloaded",
    503: "Unhealthy",
    504: "Unhealthy",
    500: "Backend",
}


_REDUCE = REDUCE_PHRASE


class Dialect(Enum):
    """The error shape of a route (gateway/api/routes.py says which route speaks which)."""

    OPENAI = "openai"
    TEI = "tei"
    COHERE = "cohere"  # {"message": ...}


# The ASGI scope key under which the outermost layer leaves the matched route's dialect for Litestar's handler.
SCOPE_DIALECT = "gateway.dialect"


@dataclass(frozen=True, slots=True)
class Problem:
    status: int
    message: str
    code: str
    param: str | None = None
    headers: dict[str, str] | None = None


def classify(exc: Exception) -> Problem:
    if isinstance(exc, NoBackendAvailable):
        return Problem(503, exc.message, exc.code, headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))})
    if isinstance(exc, RateLimited):
        return Problem(429, exc.message, exc.code, headers=exc.headers)
    if isinstance(exc, Unauthenticated):  # RFC 6750: say which scheme to use
        return Problem(401, exc.message, exc.code, headers={"WWW-Authenticate": 'Bearer realm="embedding-gateway"'})
    if isinstance(exc, GatewayError):
        return Problem(exc.status_code, exc.message, exc.code, exc.param, exc.headers)
    if isinstance(exc, InputTooLong):
        # OpenAI's words, which Elasticsearch's `openai` service looks for before it truncates and retries;
        # TEI routes answer 413 instead (see `dialect_status`), which its `hugging_face` service retries on.
        return Problem(
            400,
            f"{_REDUCE} The input is longer than this model's backends accept: {exc.message}",
            "input_too_long",
            "input",
        )
    if isinstance(exc, InputRejected):
        return Problem(400, f"the backend rejected the input: {exc.message}", "input_rejected", "input")
    if isinstance(exc, BackendError):  # the router normally wraps these; be safe anyway
        return Problem(503, f"backend failure: {exc.message}", "backend_error", headers={"Retry-After": "1"})
    if isinstance(exc, HTTPException):
        detail = exc.detail or "error"
        if exc.status_code == 413:
            detail = "request body is larger than the configured limit (server.max_body_bytes)"
        return Problem(exc.status_code, detail, "http_error", headers=dict(exc.headers or {}))
    return Problem(
        500, "internal error; the request id in x-request-id identifies it in the gateway's log", "internal_error"
    )


class _LogLimiter:
    """Token bucket for log lines about bad requests: a flood of garbage must not flood the log."""

    def __init__(self, per_s: float = 5.0, burst: int = 20) -> None:
        self._per_s, self._burst = per_s, burst
        self._tokens = float(burst)
        self._at = time.monotonic()
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._per_s)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.suppressed += 1
        return False


_limiter = _LogLimiter()
_traced: set[str] = set()  # unexpected errors get a traceback once per type and place, then one line


def log_problem(method: str, path: str, problem: Problem, exc: Exception) -> None:
    """One short line per failed request (the request id comes from the log format), rate-limited."""
    if problem.status == 499 or not _limiter.allow():
        return
    more = f" ({_limiter.suppressed} similar lines suppressed)" if _limiter.suppressed else ""
    _limiter.suppressed = 0
    line = f"{method} {path} -> {problem.status} {problem.code}: {problem.message[:200]}{more}"
    if problem.code == "internal_error":
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{type(exc).__name__}@{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else type(exc).__name__
        first = where not in _traced
        _traced.add(where)
        log.error("%s [%s: %s]", line, type(exc).__name__, str(exc)[:200], exc_info=exc if first else None)
    elif problem.status >= 500:
        log.warning("%s", line)
    else:
        log.info("%s", line)


def dialect_status(dialect: Dialect, problem: Problem) -> int:
    """The status in the route's dialect: TEI answers a too-long input with 413 (TEI before 1.9 did,
    and Elasticsearch's `hugging_face` service truncates and retries only on 413)."""
    if problem.code == "input_too_long" and dialect is Dialect.TEI:
        return 413
    return problem.status


def render(dialect: Dialect, problem: Problem) -> bytes:
    """The error body in the dialect of the route: TEI's on its routes, OpenAI's elsewhere."""
    if dialect is Dialect.TEI:
        error_type = "Empty" if "empty" in problem.message else _TEI_TYPES.get(problem.status, "Validation")
        body: Any = {"error": problem.message, "error_type": error_type}
    elif dialect is Dialect.COHERE:
        body = {"message": problem.message}
    else:
        body = {
            "error": {
                "message": problem.message,
                "type": _OPENAI_TYPES.get(problem.status, "invalid_request_error"),
                "param": problem.param,
                "code": problem.code,
            }
        }
    return msgspec.json.encode(body)


def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    problem = classify(exc)
    log_problem(request.method, request.url.path, problem, exc)
    dialect: Dialect = request.scope.get(SCOPE_DIALECT, Dialect.OPENAI)  # type: ignore[assignment]
    return Response(
        render(dialect, problem),
        status_code=dialect_status(dialect, problem),
        media_type="application/json",
        headers=problem.headers,
    )
