"""The gateway's backend error taxonomy.

Adapters translate each backend's own statuses and bodies into these few classes; the router decides
retry/fallback from the class alone, and the API maps classes to status codes in one handler.
"""

from __future__ import annotations


class BackendError(Exception):
    """A backend call failed. `retryable` says whether another attempt (here or elsewhere) may help."""

    retryable: bool = True
    kind: str = "backend_error"

    def __init__(self, backend: str, message: str, *, status: int | None = None) -> None:
        super().__init__(f"{backend}: {message}")
        self.backend = backend
        self.message = message
        self.status = status


class BackendUnavailable(BackendError):
    """Connection refused/reset, timeout, 5xx, 503 while loading: try another backend."""

    kind = "unavailable"


class BackendTimeout(BackendUnavailable):
    kind = "timeout"


class BackendOverloaded(BackendError):
    """429: the backend asks us to back off, possibly saying for how long."""

    kind = "overloaded"

    def __init__(
        self, backend: str, message: str, *, status: int | None = 429, retry_after: float | None = None
    ) -> None:
        super().__init__(backend, message, status=status)
        self.retry_after = retry_after


class PayloadTooLarge(BackendError):
    """The backend refused the request body's size (e.g. TEI's 2 MB limit): a smaller batch may pass."""

    kind = "payload_too_large"


class BackendMisconfigured(BackendError):
    """401/403/404: wrong key, wrong URL, missing endpoint. Alert an operator; other backends may serve."""

    kind = "misconfigured"


class BadBackendOutput(BackendError):
    """Wrong vector count or dimension, non-finite numbers, unparseable body: never sent to a client."""

    kind = "bad_output"


class InputRejected(BackendError):
    """The input itself is invalid for the model (too long, empty...). Retrying elsewhere will not help."""

    retryable = False
    kind = "input_rejected"


class InputTooLong(InputRejected):
    """The input has more tokens than the backend takes. Told apart because clients act on it:
    Elasticsearch truncates and retries on 413, or on a 400 with OpenAI's "reduce your prompt" words."""


def too_long_message(message: str) -> bool:
    """A backend's validation message that says the input is too long (TEI, vLLM, OpenAI wordings)."""
    m = message.lower()
    return any(w in m for w in ("too long", "too large", "maximum context length", "must have less than", "tokens"))
