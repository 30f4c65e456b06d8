"""The llama.cpp adapter against real llama.cpp servers, plus status mapping for faults a healthy
server will not produce on demand (503 while loading, 429), via httpx.MockTransport."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import numpy as np
import pytest

from backends.errors import (
    BackendMisconfigured,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    BadBackendOutput,
    InputRejected,
)
from backends.http import JsonPoster
from backends.llamacpp import LlamaCppAdapter
from backends.managed.process import LlamaCppProcess, free_port
from config.backends import LlamaCppBackend
from tests.helpers import cosines, direct_embeddings


def adapter(url: str, **kw: object) -> LlamaCppAdapter:
    return LlamaCppAdapter(
        LlamaCppBackend.model_validate({"name": "b", "kind": "llamacpp", "model": "m", "url": url, **kw})
    )


async def test_embed_returns_input_order_float32_matrix(primary: LlamaCppProcess) -> None:
    a = adapter(primary.url)
    texts = [f"sentence number {i} about {w}" for i, w in enumerate(["cats", "finance", "rain", "jazz", "code"])]
    out = await a.embed(texts)
    assert out.vectors.dtype == np.float32 and out.vectors.shape == (5, 384)
    assert cosines(out.vectors, direct_embeddings(primary.url, texts)).min() > 0.999999
    await a.aclose()


async def test_health_and_describe(primary: LlamaCppProcess) -> None:
    a = adapter(primary.url)
    assert (await a.health()).ok
    info = await a.describe()
    assert info.kind == "llamacpp" and info.dimension == 384 and info.max_input_tokens and info.max_input_tokens > 0
    assert await a.tokenize("hello there") == [101, 7592, 2045, 102]  # [CLS] hello there [SEP]
    await a.aclose()


async def test_input_longer_than_physical_batch_is_input_rejected(primary: LlamaCppProcess) -> None:
    a = adapter(primary.url)
    with pytest.raises(InputRejected, match=r"too large|context"):
        await a.embed(["word " * 700])
    await a.aclose()


async def test_connection_refused_is_unavailable() -> None:
    a = adapter(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(BackendUnavailable, match="connection failed"):
        await a.embed(["x"])
    await a.aclose()


async def test_wrong_api_key_is_misconfigured_and_key_never_leaks(
    llama_factory: Callable[..., LlamaCppProcess],
) -> None:
    server = llama_factory("keyed", api_key="right-key")
    good = adapter(server.url, api_key="right-key")
    assert (await good.embed(["ok"])).vectors.shape == (1, 384)
    bad = adapter(server.url, api_key="wrong-key-123")
    with pytest.raises(BackendMisconfigured) as info:
        await bad.embed(["x"])
    assert "wrong-key-123" not in str(info.value)
    await good.aclose()
    await bad.aclose()
    server.stop()


def mocked(handler: Callable[[httpx.Request], httpx.Response]) -> LlamaCppAdapter:
    a = adapter("http://backend.invalid")
    a._client = httpx.AsyncClient(base_url="http://backend.invalid", transport=httpx.MockTransport(handler))
    a._poster = JsonPoster(a._client, "http://backend.invalid", 1.0)
    return a


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (
            httpx.Response(503, json={"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}),
            BackendUnavailable,
        ),
        (httpx.Response(429, headers={"Retry-After": "3"}, json={}), BackendOverloaded),
        (
            httpx.Response(500, json={"error": {"code": 500, "message": "boom", "type": "server_error"}}),
            BackendUnavailable,
        ),
        (
            httpx.Response(501, json={"error": {"message": "This server does not support embeddings.", "code": 501}}),
            BackendMisconfigured,
        ),
        (httpx.Response(404, json={"error": {"message": "File Not Found", "code": 404}}), BackendMisconfigured),
        (httpx.Response(200, content=b"{not json"), BadBackendOutput),
        (
            httpx.Response(200, json={"data": [{"embedding": "AAAA", "index": 0}, {"embedding": "AAAA", "index": 1}]}),
            BadBackendOutput,
        ),
        (httpx.Response(200, json={"data": [{"embedding": "!!notbase64", "index": 0}]}), BadBackendOutput),
    ],
)
async def test_status_mapping(response: httpx.Response, error: type[Exception]) -> None:
    a = mocked(lambda _req: response)
    with pytest.raises(error) as info:
        await a.embed(["one"])
    if isinstance(info.value, BackendOverloaded):
        assert info.value.retry_after == 3.0


async def test_timeout_is_backend_timeout() -> None:
    def hang(_req: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("read timed out")

    with pytest.raises(BackendTimeout):
        await mocked(hang).embed(["x"])


async def test_requests_base64_and_sends_no_prompt_or_dimensions() -> None:
    seen: list[bytes] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.content)
        return httpx.Response(
            200, json={"data": [{"embedding": "AACAPw==", "index": 0}], "usage": {"prompt_tokens": 1}}
        )

    out = await mocked(handler).embed(["plain text"])
    assert out.vectors.tolist() == [[1.0]]
    import json

    body = json.loads(seen[0])
    assert body == {"input": ["plain text"], "model": "m", "encoding_format": "base64"}
