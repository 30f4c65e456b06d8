"""Errors the gateway raises on behalf of clients. Backend errors live in backends/errors.py."""

from __future__ import annotations

# OpenAI's words for an over-long input: Elasticsearch's `openai` service truncates and retries when it reads them.
REDUCE_PHRASE = "Please reduce your prompt; or completion length."


class GatewayError(Exception):
    status_code: int = 500
    code: str = "internal_error"
    headers: dict[str, str] | None = None  # response headers the error needs (Allow, Retry-After...)

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(GatewayError):
    status_code = 400
    code = "invalid_request"


class ModelNotFound(GatewayError):
    status_code = 404
    code = "model_not_found"


class RouteNotFound(GatewayError):
    """A path the route table does not hold: nothing is served there, whatever the key."""

    status_code = 404
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status_code = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message)
        self.headers = {"Allow": allow}


class AmbiguousCredentials(GatewayError):
    """Two different credentials in one request: refused rather than guessing which one counts."""

    status_code = 400
    code = "ambiguous_credentials"


class InputOverLimit(GatewayError):
    """An input longer than the model's limit, counted with its tokenizer: refused before any backend is
    called (413 on TEI's routes, see api/errors.dialect_status)."""

    status_code = 400
    code = "input_too_long"


class PayloadTooLarge(GatewayError):
    status_code = 413
    code = "payload_too_large"


class NoBackendAvailable(GatewayError):
    """No compatible backend could serve: 503 with Retry-After, never partial data."""

    status_code = 503
    code = "no_backend_available"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(NoBackendAvailable):
    """The gateway itself holds as much work as it may (bodies, texts in flight): 503 + Retry-After."""

    code = "overloaded"


class ClientDisconnected(GatewayError):
    """The client went away before its answer was ready: its work was cancelled; nobody reads a reply."""

    status_code = 499
    code = "client_closed_request"


class ShuttingDown(NoBackendAvailable):
    """The gateway is stopping and the request outlived the shutdown grace."""

    code = "shutting_down"


class DeadlineExceeded(GatewayError):
    """The request's deadline passed before any backend answered: 504."""

    status_code = 504
    code = "deadline_exceeded"


class Unauthenticated(GatewayError):
    """No valid caller key: 401."""

    status_code = 401
    code = "invalid_api_key"


class Forbidden(GatewayError):
    """A valid key that may not do this (an admin route): 403."""

    status_code = 403
    code = "permission_denied"


class RateLimited(GatewayError):
    """The key's quota is used up for now: 429 with Retry-After and the x-ratelimit-* headers."""

    status_code = 429

    def __init__(self, message: str, *, code: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.code = code
        self.headers = headers


class QuotaStorageUnavailable(NoBackendAvailable):
    """The shared quota store is unreachable and `on_storage_error = "reject"`: 503."""

    code = "quota_storage_unavailable"
