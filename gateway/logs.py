"""The request id in every log line. Kept free of heavy imports: the CLI configures logging before
`serve --workers N` sets up multiprocess metrics (which must precede importing prometheus_client)."""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from typing import Any

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
# What the embedding route learned about the request (model, backends), for the access line.
REQUEST_INFO: ContextVar[dict[str, Any] | None] = ContextVar("request_info", default=None)
ACCESS = logging.getLogger("embedding_gateway.access")

_FIELDS = ("route", "method", "status", "model", "backends", "texts", "latency_ms", "key", "worker")


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record (`-` outside a request), for the log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """`[server] log_format = "json"`: one JSON object per line, for log pipelines."""

    def __init__(self, tag: str = "") -> None:
        super().__init__()
        self._tag = tag

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if self._tag:
            out["process"] = self._tag
        for field in _FIELDS:
            if (value := getattr(record, field, None)) is not None:
                out[field] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)
