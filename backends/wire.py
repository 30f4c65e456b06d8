"""A minimal HTTP/1.1 keep-alive client for the hot path's JSON POSTs to plain-http backends.

Every client request costs one backend call, and profiled at 32 concurrent requests aiohttp's client
(request objects, payload registry, stream writer and reader) was about a sixth of the gateway's CPU.
This sends one pre-built request and parses the answer with httptools (the parser uvicorn serves with):
a pool of kept-alive connections per backend, the body read whole, nothing else. What it does not do
(TLS, proxies, redirects, compression) the backends' aiohttp path still does: `JsonPoster` uses this only
for `http://` URLs. Failures are raised as aiohttp's exceptions, so `transport_errors` maps them the same
way (lost connection -> unavailable, no answer in time -> timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import aiohttp
import httptools

_IDLE_MAX = 32  # kept-alive connections per backend; more concurrent calls open (and then close) extra ones


class _Connection(asyncio.Protocol):
    """One connection; one request at a time. httptools calls the on_* methods while data is fed."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[None] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._complete = False
        self._headers_done = False
        self._keep_alive = False
        self.answered = False  # any byte of an answer came

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(aiohttp.ClientPayloadError(f"malformed HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._answer is None or self._answer.done():
            return
        if self._headers_done and not self._framed():  # a body that ends where the connection does
            self._complete = True
            self._answer.set_result(None)
            return
        self._fail(aiohttp.ServerDisconnectedError("the backend closed the connection before answering"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._keep_alive = self._parser.should_keep_alive()  # only valid until the message completes

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._complete = True
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(None)

    def _framed(self) -> bool:
        return "content-length" in self._headers or "chunked" in self._headers.get("transfer-encoding", "")

    def _fail(self, exc: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)

    async def exchange(self, request: bytes, timeout_s: float) -> tuple[int, dict[str, str], bytes]:
        assert self.transport is not None
        self._answer = asyncio.get_running_loop().create_future()
        self._headers, self._body, self._complete, self._headers_done, self._keep_alive = {}, [], False, False, False
        self.answered = False
        self.transport.write(request)
        try:
            async with asyncio.timeout(timeout_s):
                await self._answer
        except TimeoutError:
            raise aiohttp.ServerTimeoutError(f"no answer within {timeout_s:.1f}s") from None
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        return self._parser.get_status_code(), self._headers, body

    @property
    def reusable(self) -> bool:
        return self._complete and self._keep_alive and not self.lost

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class WireClient:
    """Kept-alive connections to one `http://host:port`, for POSTs with a fixed set of headers."""

    def __init__(self, host: str, port: int, headers: Mapping[str, str], connect_timeout_s: float) -> None:
        self._host, self._port = host, port
        self._connect_timeout_s = connect_timeout_s
        named = f"[{host}]" if ":" in host else host  # an IPv6 address
        host_header = named if port == 80 else f"{named}:{port}"
        lines = [f"Host: {host_header}"] + [f"{k}: {v}" for k, v in headers.items() if k.lower() != "host"]
        self._head = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self._idle: list[_Connection] = []

    async def post(self, path: str, body: bytes, timeout_s: float) -> tuple[int, dict[str, str], bytes]:
        request = b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (path.encode(), self._head, len(body), body)
        conn = self._checkout()
        stale_ok = conn is not None  # a kept-alive connection may have been closed by the server just now
        while True:
            conn = conn or await self._connect()
            try:
                answer = await conn.exchange(request, timeout_s)
                break
            except aiohttp.ServerDisconnectedError:
                conn.close()
                if not stale_ok or conn.answered:
                    raise
                # Closed by the server (its keep-alive timeout) as the request went out, before any answer:
                # once more on a fresh connection. Embedding is idempotent; aiohttp and urllib3 do the same.
                conn, stale_ok = None, False
            except BaseException:
                conn.close()  # half-read or cancelled: never reused
                raise
        if conn.reusable and len(self._idle) < _IDLE_MAX:
            self._idle.append(conn)
        else:
            conn.close()
        return answer

    def _checkout(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the least likely to have timed out
            if not conn.lost:
                return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(_Connection, self._host, self._port)
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError(f"no connection within {self._connect_timeout_s:.1f}s") from None
        except OSError as exc:
            raise aiohttp.ClientOSError(exc.errno, f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        return conn

    def close(self) -> None:
        for conn in self._idle:
            with contextlib.suppress(Exception):
                conn.close()
        self._idle.clear()
