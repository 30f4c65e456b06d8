"""Pieces every HTTP adapter shares: one pooled client per backend, transport-error mapping, parsing."""

from __future__ import annotations

import base64
import email.utils
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
import httpx
import numpy as np
from httpx_aiohttp import AiohttpTransport

from backends.errors import BackendTimeout, BackendUnavailable, BadBackendOutput
from backends.wire import WireClient


def make_client(
    base_url: str,
    *,
    timeout_s: float,
    connect_timeout_s: float,
    headers: dict[str, str] | None = None,
    verify: ssl.SSLContext | str | bool = True,
) -> httpx.AsyncClient:
    """One long-lived client per backend, with httpx's API over aiohttp's connection pool.

    httpcore's pool checks every pooled socket on every request (`has_expired` -> `is_socket_readable`);
    profiled under 32 concurrent requests that was ~27% of the gateway's CPU and httpx ~75% overall.
    The aiohttp transport keeps the httpx API (and MockTransport in tests) and measured 2.5x the
    throughput with a 4x lower p99 (bench/gateway_overhead.py).
    """
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
    headers = dict(headers or {})
    parts = urlsplit(base_url)
    if parts.username is not None:
        # user:password in the URL means basic auth. Send it as a header and keep it out of the URL:
        # aiohttp refuses URL credentials next to an Authorization header, and URLs end up in logs.
        if "Authorization" not in headers:
            userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode()
        base_url = redact_url(base_url)
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        limits=limits,
        transport=AiohttpTransport(limits=limits, verify=verify),
        headers=headers,
    )


@dataclass(frozen=True, slots=True)
class RawResponse:
    """An embedding call's answer: status, headers, body (an httpx.Response only when it is an error)."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes
    url: str

    def as_httpx(self) -> httpx.Response:
        return httpx.Response(
            self.status_code, headers=dict(self.headers), content=self.content, request=httpx.Request("POST", self.url)
        )


class JsonPoster:
    """POST a JSON body on the hot path (embedding calls) without httpx's request and response models:
    profiled at 32 concurrent requests, httpx's layer (URL merging, request building, streaming the body
    back) was about a fifth of the gateway's CPU, and aiohttp's client below it a sixth. `http://`
    backends get the minimal keep-alive client (backends/wire.py), `https://` ones aiohttp's pool (the one
    the backend's httpx client uses); any other transport (httpx.MockTransport in tests) goes through the
    httpx client as before.
    """

    def __init__(self, client: httpx.AsyncClient, base_url: str, connect_timeout_s: float) -> None:
        self._client = client
        # Never the URL's user:password: make_client sent them as a Basic Authorization header, and aiohttp
        # refuses a request that has both (every call would fail).
        self._base = redact_url(base_url).rstrip("/")
        self._connect = connect_timeout_s
        # The client's headers (auth, user agent) without its accept-encoding: aiohttp decodes what it
        # can itself, and vectors compress poorly anyway.
        self._headers = {k: v for k, v in client.headers.items() if k.lower() != "accept-encoding"}
        self._headers["Content-Type"] = "application/json"
        transport = client._transport  # the one we built in make_client, or a test's
        self._aiohttp = transport if isinstance(transport, AiohttpTransport) else None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        # Plain http: the minimal keep-alive client (backends.wire); https and the rest: aiohttp.
        parts = urlsplit(self._base)
        self._wire: WireClient | None = None
        self._wire_prefix = parts.path
        if self._aiohttp is not None and parts.scheme == "http" and parts.hostname:
            self._wire = WireClient(parts.hostname, parts.port or 80, self._headers, connect_timeout_s)

    async def post(self, path: str, body: bytes, read_timeout_s: float) -> RawResponse:
        url = self._base + path
        if self._wire is not None:
            status, headers, content = await self._wire.post(self._wire_prefix + path, body, read_timeout_s)
            return RawResponse(status, headers, content, url)
        if self._aiohttp is None:
            limits = httpx.Timeout(read_timeout_s, connect=self._connect)
            headers = {"Content-Type": "application/json"}
            r = await self._client.post(path, content=body, timeout=limits, headers=headers)
            return RawResponse(r.status_code, r.headers, r.content, url)
        session = self._aiohttp.client
        if not isinstance(session, aiohttp.ClientSession):
            session = self._aiohttp.client = self._aiohttp.get_client()
        timeout = self._timeouts.get(read_timeout_s)
        if timeout is None:  # one per distinct call size: built once, not per call
            timeout = aiohttp.ClientTimeout(sock_connect=self._connect, sock_read=read_timeout_s, connect=self._connect)
            if len(self._timeouts) < 256:
                self._timeouts[read_timeout_s] = timeout
        async with session.post(
            url, data=body, headers=self._headers, timeout=timeout, allow_redirects=False, compress=False
        ) as answer:
            return RawResponse(answer.status, answer.headers, await answer.read(), url)

    def close(self) -> None:
        if self._wire is not None:
            self._wire.close()


@asynccontextmanager
async def transport_errors(backend: str) -> AsyncIterator[None]:
    """Turn httpx's and aiohttp's transport exceptions into the taxonomy; never let a traceback reach a client."""
    try:
        yield
    except aiohttp.ServerTimeoutError as exc:  # no answer within the call's read timeout
        raise BackendTimeout(backend, f"timed out ({type(exc).__name__})") from exc
    except aiohttp.ClientError as exc:
        raise BackendUnavailable(backend, f"connection failed: {type(exc).__name__}: {exc}".rstrip(": ")) from exc
    except httpx.TimeoutException as exc:
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, TimeoutError):
            # The aiohttp transport reports every dropped connection as ConnectTimeout; say what it was.
            raise BackendUnavailable(backend, f"connection failed: {type(cause).__name__}: {cause}") from exc
        raise BackendTimeout(backend, f"timed out ({type(exc).__name__})") from exc
    except (httpx.TransportError, httpx.StreamError) as exc:
        raise BackendUnavailable(backend, f"connection failed: {type(exc).__name__}: {exc}".rstrip(": ")) from exc


def redact_url(url: str) -> str:
    """The URL without user:password, for logs and /v1/backends."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def retry_after_seconds(value: str | None) -> float | None:
    """Parse Retry-After: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def decode_base64_vector(backend: str, data: str) -> np.ndarray:
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as exc:
        raise BadBackendOutput(backend, f"embedding is not valid base64: {exc}") from exc
    if len(raw) % 4:
        raise BadBackendOutput(backend, f"base64 embedding has {len(raw)} bytes, not a multiple of 4")
    return np.frombuffer(raw, dtype="<f4")


def stack_rows(backend: str, rows: list[np.ndarray] | list[list[float]]) -> np.ndarray:
    """Rows of one response into an (n, dim) float32 matrix; ragged rows are a backend fault."""
    if not rows:
        return np.empty((0, 0), dtype=np.float32)
    try:
        matrix = np.asarray(rows, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise BadBackendOutput(backend, f"embeddings are not a matrix of numbers: {exc}") from exc
    if matrix.ndim != 2:
        raise BadBackendOutput(backend, f"embeddings have shape {matrix.shape}, expected (n, dim)")
    return matrix


def error_message(resp: httpx.Response) -> str:
    """The human part of an error body, whatever its dialect (OpenAI, llama.cpp, TEI, plain text)."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300] or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err.get("reason") or err)[:500]
        if isinstance(err, str):
            return err[:500]
        if "message" in body:
            return str(body["message"])[:500]
    return str(body)[:300]
