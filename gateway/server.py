"""The HTTP server: uvicorn with httptools, plus the connection hygiene uvicorn lacks.

uvicorn closes idle keep-alive connections (`keepalive_timeout_s`) but has no header-read timeout:
a socket that connects and never sends (or sends a byte a minute: slowloris) is held forever, and
1,100 of them under a 1,024-fd limit made normal requests and even health checks to the backends
fail with "Too many open files". So:

- a request must arrive complete (headers and body) within `header_timeout_s` of the connection
  opening or of its first byte on a kept-alive connection, or the connection is closed;
- at most `max_connections` client connections are open (default: the fd limit less a reserve for
  backends and files); a new connection beyond that closes the oldest one that is not being
  answered (silent sockets go first), so real clients always get in;
- the soft fd limit is raised to the hard limit at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from config.settings import ServerSettings

log = logging.getLogger(__name__)

_FD_RESERVE_SHARE = 4  # keep a quarter of the fds (at least 64) for backends, children and files
# The scope key of the connection's disconnect hook (gateway.api.direct.until_disconnect uses it).
DISCONNECT_HOOK = "gateway.disconnect"


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 65536


def default_max_connections(fd_limit: int) -> int:
    return max(16, fd_limit - max(64, fd_limit // _FD_RESERVE_SHARE))


class GuardedHttpProtocol(HttpToolsProtocol):
    """httptools' protocol with a request-read timeout and a cap on open connections."""

    header_timeout_s: float = 10.0
    max_connections: int = 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._opened = time.monotonic()
        self._read_timer: asyncio.TimerHandle | None = None
        self._on_lost: list[Callable[[], None]] = []
        self._lost = False
        self._arm()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def _arm(self) -> None:
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self.header_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    @property
    def answering(self) -> bool:
        """A complete request is being answered: never evicted."""
        cycle = self.cycle
        return cycle is not None and not cycle.more_body and not cycle.response_complete

    def _make_room(self) -> None:
        idle = [c for c in self.connections if isinstance(c, GuardedHttpProtocol) and not c.answering]
        victim = min(idle, key=lambda c: c._opened, default=self)
        victim.transport.close()

    def watch(self, callback: Callable[[], None]) -> bool:
        """Call `callback` when the client's connection is lost (a request's disconnect, without a task
        per request awaiting `receive()` for it); False when it is lost already."""
        if self._lost:
            return False
        self._on_lost.append(callback)
        return True

    def unwatch(self, callback: Callable[[], None]) -> None:
        if callback in self._on_lost:
            self._on_lost.remove(callback)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.scope[DISCONNECT_HOOK] = self  # type: ignore[literal-required]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # a kept-alive connection that starts a request must finish it in time too

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        self._lost = True
        callbacks, self._on_lost = self._on_lost, []
        for callback in callbacks:
            callback()


def protocol_for(server: ServerSettings, fd_limit: int) -> type[GuardedHttpProtocol]:
    attrs: dict[str, Any] = {
        "header_timeout_s": server.header_timeout_s,
        "max_connections": server.max_connections or default_max_connections(fd_limit),
    }
    return type("GatewayHttpProtocol", (GuardedHttpProtocol,), attrs)


def uvicorn_config(app: Any, server: ServerSettings, **overrides: Any) -> uvicorn.Config:
    fd_limit = raise_fd_limit()
    options: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "log_level": server.log_level,
        "access_log": False,  # per-request logs cost more than the proxy hop; metrics count requests
        "timeout_graceful_shutdown": int(server.shutdown_grace_s),
        "timeout_keep_alive": server.keepalive_timeout_s,
        "lifespan": "on",
        "http": protocol_for(server, fd_limit),
        # JSON logs: uvicorn's own lines go through our (JSON) root handler instead of its own format.
        **({"log_config": None} if server.log_format == "json" else {}),
        **overrides,
    }
    return uvicorn.Config(app, **options)
