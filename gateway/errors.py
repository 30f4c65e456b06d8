"""Errors the gateway raises on behalf of clients. Backend errors live in backends/errors.py."""

from __future__ import annotations


class GatewayError(Exception):
    status_code: int = 500
    code: str = "internal_error"

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


class DeadlineExceeded(GatewayError):
    """The request's deadline passed before any backend answered: 504."""

    status_code = 504
    code = "deadline_exceeded"
