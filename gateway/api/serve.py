"""What every embedding route does around its dialect: admit the body, parse, embed while the client
is still there, render. The dialects (OpenAI, TEI) only supply `parse` and `render`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from litestar import Request, Response
from litestar.background_tasks import BackgroundTask
from litestar.types import Receive

from gateway.api.inputs import request_timeout
from gateway.errors import ClientDisconnected
from gateway.pipeline import EmbedRequest
from gateway.runtime import Runtime
from gateway.service import EmbedResult

T = TypeVar("T")


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it when the client disconnects: a client that left costs nothing more.

    Only valid once the request body has been read: from then on the server's `receive()` returns
    nothing but `http.disconnect`.
    """
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we are cancelled ourselves (shutdown): take the work down with us
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientDisconnected("the client disconnected; its request was cancelled")


def _content_length(request: Request[Any, Any, Any], limit: int) -> int:
    try:
        return max(0, min(int(request.headers.get("content-length", "")), limit))
    except ValueError:
        return limit  # chunked: assume the worst the server accepts


async def serve_embeddings(
    request: Request[Any, Any, Any],
    parse: Callable[[bytes, Runtime], EmbedRequest],
    render: Callable[[EmbedResult, EmbedRequest], bytes],
) -> Response[bytes]:
    runtime: Runtime = request.app.state.runtime  # this request stays on it, even if a reload swaps it
    runtime.active += 1
    try:
        return await _serve(request, runtime, parse, render)
    finally:
        runtime.active -= 1


async def _serve(
    request: Request[Any, Any, Any],
    runtime: Runtime,
    parse: Callable[[bytes, Runtime], EmbedRequest],
    render: Callable[[EmbedResult, EmbedRequest], bytes],
) -> Response[bytes]:
    budget = runtime.budget
    with budget.body(_content_length(request, runtime.settings.server.max_body_bytes)):
        req = parse(await request.body(), runtime)
        timeout = request_timeout(request.headers.get("x-request-timeout"))
        with budget.work(len(req.texts)):
            result = await until_disconnect(request.receive, runtime.service.embed(req, timeout))
        background = BackgroundTask(result.after) if result.after is not None else None
        return Response(
            render(result, req),
            media_type="application/json",
            headers=runtime.result_headers(result),
            background=background,
        )
