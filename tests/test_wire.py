"""The hot path's minimal HTTP/1.1 client (backends/wire.py) against raw servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest

from backends.managed.process import free_port
from backends.wire import WireClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]
OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok": 123}'


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[int, list[int]]]:
    """A server calling `handler(reader, writer, n)` for the n-th request on each connection (from 0) until it
    returns False; yields (port, requests per connection)."""
    per_connection: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        per_connection.append(0)
        me = len(per_connection) - 1
        try:
            while True:
                await read_request(reader)
                per_connection[me] += 1
                if not await handler(reader, writer, per_connection[me] - 1):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    port = free_port()
    srv = await asyncio.start_server(serve, "127.0.0.1", port)
    try:
        yield port, per_connection
    finally:
        srv.close()


def slow_first(seconds: float) -> Handler:
    """Answers OK, the first request on each connection only after `seconds`."""

    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
        await asyncio.sleep(seconds if n == 0 else 0)
        w.write(OK)
        await w.drain()
        return True

    return handler


def client(port: int) -> WireClient:
    return WireClient("127.0.0.1", port, {"Content-Type": "application/json"}, connect_timeout_s=2)


async def answer_ok(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> bool:
    w.write(OK)
    await w.drain()
    return True


async def test_one_kept_alive_connection_serves_many_calls() -> None:
    async with server(answer_ok) as (port, conns):
        c = client(port)
        for _ in range(20):
            assert await c.post("/v1/embeddings", b"{}", 5) == (
                200,
                {"content-type": "application/json", "content-length": "11"},
                b'{"ok": 123}',
            )
        assert conns == [20]
        c.close()


async def test_a_kept_alive_connection_the_server_closed_is_retried_once_on_a_fresh_one() -> None:
    async def first_only(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> bool:
        if n > 0:
            return False  # read the request, close without a word: a keep-alive timeout racing the request
        w.write(OK)
        await w.drain()
        return True

    async with server(first_only) as (port, conns):
        c = client(port)
        for _ in range(3):
            status, _, _ = await c.post("/", b"{}", 5)
            assert status == 200
        assert conns == [2, 2, 1]  # each reused connection failed once, each retry on a new one answered


async def test_a_fresh_connection_closed_without_an_answer_is_an_error_not_a_loop() -> None:
    async def never(_r: asyncio.StreamReader, _w: asyncio.StreamWriter, _n: int) -> bool:
        return False

    async with server(never) as (port, conns):
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await client(port).post("/", b"{}", 5)
        assert conns == [1]


async def test_chunked_and_unframed_bodies_are_read_whole() -> None:
    async def chunked(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await w.drain()
        return True

    async def until_close(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> bool:
        w.write(b"HTTP/1.0 200 OK\r\n\r\nthe body ends with the connection")
        await w.drain()
        return False

    async with server(chunked) as (port, _):
        assert (await client(port).post("/", b"{}", 5))[2] == b"hello world"
    async with server(until_close) as (port, _):
        assert (await client(port).post("/", b"{}", 5))[2] == b"the body ends with the connection"


async def test_connection_close_and_errors_never_leave_a_connection_for_reuse() -> None:
    async def closing(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> bool:
        w.write(b"HTTP/1.1 503 Busy\r\nConnection: close\r\nRetry-After: 3\r\nContent-Length: 4\r\n\r\nbusy")
        await w.drain()
        return False

    async with server(closing) as (port, conns):
        c = client(port)
        for _ in range(2):
            status, headers, body = await c.post("/", b"{}", 5)
            assert (status, headers["retry-after"], body) == (503, "3", b"busy")
        assert conns == [1, 1]

    async with server(slow_first(0.5)) as (port, conns):
        c = client(port)
        with pytest.raises(aiohttp.ServerTimeoutError):
            await c.post("/", b"{}", 0.1)
        assert (await c.post("/", b"{}", 5))[0] == 200
        assert len(conns) == 2  # the timed-out connection (an answer may still come on it) was dropped

    async def garbage(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> bool:
        w.write(b"NOT HTTP AT ALL\r\n\r\n")
        await w.drain()
        return True

    async with server(garbage) as (port, _):
        with pytest.raises(aiohttp.ClientPayloadError):
            await client(port).post("/", b"{}", 5)


async def test_nothing_listening_is_a_connection_error() -> None:
    with pytest.raises(aiohttp.ClientOSError):
        await client(free_port()).post("/", b"{}", 5)


async def test_a_cancelled_call_drops_its_connection() -> None:
    async with server(slow_first(0.3)) as (port, conns):
        c = client(port)
        call = asyncio.ensure_future(c.post("/", b"{}", 5))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert (await c.post("/", b"{}", 5))[0] == 200
        assert len(conns) == 2  # its late answer can never be read as the next call's
