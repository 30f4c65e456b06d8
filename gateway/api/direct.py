"""The embedding routes (`POST /v1/embeddings`, `POST /embed`) served straight from ASGI.

They are nearly all of the traffic, and profiled under load Litestar's own layers (routing, request
and response objects, its exception middleware) were about a tenth of the gateway's CPU per request.
So these skip it; every other route stays with Litestar. The behaviour is the same: the body
limit (413), the work budget, the client's deadline, cancellation when the client leaves, errors in
the client's dialect, shadows after the response. The route table (gateway/api/routes.py) says which
routes come here; the outermost layer has already normalised the path, checked the key and the method.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from litestar.datastructures import State
from litestar.types import Receive, Scope, Send

from gateway.api import errors
from gateway.api.inputs import request_timeout
from gateway.auth.guard import CALLER
from gateway.errors import ClientDisconnected, PayloadTooLarge
from gateway.logs import REQUEST_INFO
from gateway.pipeline import EmbedRequest
from gateway.runtime import Runtime
from gateway.server import DISCONNECT_HOOK, GuardedHttpProtocol
from gateway.service import EmbedResult

T = TypeVar("T")
Parse = Callable[[bytes, Runtime], EmbedRequest]
Render = Callable[[EmbedResult, EmbedRequest], bytes]
_JSON = (b"content-type", b"application/json")
_TOO_LARGE = "request body is larger than the configured limit (server.max_body_bytes)"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected while sending its request")
        chunk: bytes = message.get("body", b"")  # type: ignore[assignment]
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(_TOO_LARGE)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def until_disconnect(scope: Scope, receive: Receive, work: Awaitable[T]) -> T:
    """Await `work` in this task, cancelling it when the client disconnects: a client that left
    costs nothing more. Only valid once the body has been read (from then on uvicorn's `receive()`
    returns nothing but `http.disconnect`). Our server's protocol calls back on the disconnect itself;
    any other server gets a watcher task awaiting `receive()` (~5 % of the CPU per request, profiled)."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    def lost() -> None:
        nonlocal gone
        gone = True
        task.cancel()

    hook = cast("GuardedHttpProtocol | None", scope.get(DISCONNECT_HOOK))
    watcher: asyncio.Future[None] | None = None
    if hook is not None:
        if not hook.watch(lost):
            if inspect.iscoroutine(work):
                work.close()  # never started: no "never awaited" warning
            raise ClientDisconnected("the client disconnected; its request was cancelled")
    else:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            lost()

        watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:  # our own cancel, nobody else's (shutdown still propagates)
            raise ClientDisconnected("the client disconnected; its request was cancelled") from None
        raise
    finally:
        if watcher is not None:
            watcher.cancel()
        elif hook is not None:
            hook.unwatch(lost)


class EmbeddingRoutes:
    """Serves one dialect's (parse, render) pair; the runtime is read per request (a reload swaps it)."""

    def __init__(self, state: State) -> None:
        self._state = state

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, handler: tuple[Parse, Render], dialect: errors.Dialect
    ) -> None:
        runtime: Runtime = self._state.runtime  # this request stays on it, even if a reload swaps it
        parse, render = handler
        runtime.active += 1
        try:
            try:
                result, body, headers = await self._embed(scope, receive, runtime, parse, render)
            except Exception as exc:  # CancelledError is not one: shutdown is answered by RequestContext
                await respond_error(send, "POST", scope["path"], dialect, exc)
                return
            await respond(send, 200, body, headers)
            if result.after is not None:  # shadows: after the client has its answer
                with contextlib.suppress(Exception):
                    await result.after()
        finally:
            runtime.active -= 1

    async def _embed(
        self, scope: Scope, receive: Receive, runtime: Runtime, parse: Parse, render: Render
    ) -> tuple[EmbedResult, bytes, list[tuple[bytes, bytes]]]:
        limit = runtime.settings.server.max_body_bytes
        declared = _header(scope, b"content-length")
        try:
            size = max(0, min(int(declared), limit + 1)) if declared is not None else limit
        except ValueError:
            size = limit  # unreadable: assume the worst the server accepts
        if size > limit:
            raise PayloadTooLarge(_TOO_LARGE)
        budget = runtime.budget
        with budget.body(size):
            req = parse(await read_body(receive, limit), runtime)
            if req.model in runtime.aliases:  # another name for a model, with its own default prompt
                model, prompt = runtime.aliases[req.model]
                req = dataclasses.replace(req, model=model, alias=req.model, default_prompt=prompt)
            control = (_header(scope, b"cache-control") or "").lower()
            if "no-store" in control:  # neither read nor write the cache
                req = dataclasses.replace(req, cache="off")
            elif "no-cache" in control:  # fresh vectors (which then refresh the cache)
                req = dataclasses.replace(req, cache="refresh")
            info: dict[str, Any] = {"model": req.model, "texts": len(req.texts)}
            if runtime.settings.server.log_format == "json":  # only the JSON access line reads it
                REQUEST_INFO.set(info)
            timeout = request_timeout(_header(scope, b"x-request-timeout"))
            caller = CALLER.get()
            quota: dict[str, str] = {}
            if caller is not None:
                runtime.guard.allow_model(caller, req.model, req.model in runtime.profiles)
                quota = await runtime.quotas.admit(caller, len(req.texts))
            with budget.work(len(req.texts)):
                result = await until_disconnect(scope, receive, runtime.service.embed(req, timeout))
            body = render(result, req)
        if caller is not None:
            runtime.metrics.key_served(caller.name, req.model, len(req.texts), result.prompt_tokens)
        info["backends"] = list(result.backends)
        headers = [(k.encode(), v.encode()) for k, v in (runtime.result_headers(result) | quota).items()]
        return result, body, headers


async def respond_error(send: Send, method: str, path: str, dialect: errors.Dialect, exc: Exception) -> None:
    """An error in the dialect of the route, logged once (rate-limited), with its headers."""
    problem = errors.classify(exc)
    errors.log_problem(method, path, problem, exc)
    extra = [(k.lower().encode(), v.encode()) for k, v in (problem.headers or {}).items()]
    await respond(send, errors.dialect_status(dialect, problem), errors.render(dialect, problem), extra)


async def respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    start: Any = {
        "type": "http.response.start",
        "status": status,
        "headers": [_JSON, (b"content-length", str(len(body)).encode()), *headers],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})
