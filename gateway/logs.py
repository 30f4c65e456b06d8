"""The request id in every log line. Kept free of heavy imports: the CLI configures logging before
`serve --workers N` sets up multiprocess metrics (which must precede importing prometheus_client)."""

from __future__ import annotations

import logging
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record (`-` outside a request), for the log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True
