"""The OpenAI-compatible adapter: against llama.cpp's real OpenAI route, and vLLM/OpenAI error shapes."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from backends.errors import BackendMisconfigured, BackendOverloaded, BackendUnavailable, InputRejected, PayloadTooLarge
from backends.http import JsonPoster
from backends.managed.process import LlamaCppProcess
from backends.openai import OpenAICompatAdapter
from config.backends import OpenAIBackend
from tests.helpers import (
    MINILM,
    MINILM_MRL,
    TEXTS,
    cosines,
    direct_embeddings,
    embed,
    run_gateway,
    settings_for,
    unit,
    vectors_of,
)


def openai_backend(name: str, url: str, model: str = "minilm", **kw: object) -> dict[str, object]:
    return {"name": name, "kind": "openai", "model": model, "url": url, **kw}


def served_name(url: str) -> str:
    return str(httpx.get(f"{url}/v1/models").json()["data"][0]["id"])


def test_vectors_equal_the_server_behind_it(primary: LlamaCppProcess) -> None:
    # llama.cpp's OpenAI route stands in for vLLM: same protocol, a real server. Like vLLM it lists
    # the model it serves, and the adapter insists that `remote_model` is one of them.
    name = served_name(primary.url)
    backends = [
        openai_backend("vllm-ish", primary.url + "/v1", "minilm", remote_model=name),
        openai_backend("vllm-ish-mrl", primary.url, "minilm-mrl", remote_model=name),
    ]
    with run_gateway(settings_for(backends, [MINILM, MINILM_MRL])) as gw:
        one = embed(gw, "minilm", "just one")
        assert one.headers["x-embedding-backend"] == "vllm-ish"
        assert cosines(vectors_of(one), direct_embeddings(primary.url, ["just one"])).min() >= 0.99999
        batch = vectors_of(embed(gw, "minilm", TEXTS))
        assert cosines(batch, direct_embeddings(primary.url, TEXTS)).min() >= 0.99999
        cut = vectors_of(embed(gw, "minilm-mrl", TEXTS, dimensions=128, prompt_name="query"))
        full = direct_embeddings(primary.url, ["query: " + t for t in TEXTS])
        assert cosines(cut, unit(full[:, :128])).min() >= 0.99999


def mocked(handler: Callable[[httpx.Request], httpx.Response], **kw: object) -> OpenAICompatAdapter:
    cfg = OpenAIBackend.model_validate(openai_backend("o", "http://vllm.invalid", "m", **kw))
    a = OpenAICompatAdapter(cfg)
    a._client = httpx.AsyncClient(base_url="http://vllm.invalid", transport=httpx.MockTransport(handler))
    a._poster = JsonPoster(a._client, "http://vllm.invalid", 1.0)
    return a


async def test_request_shape_never_sends_null_encoding_format() -> None:
    seen: list[dict[str, object]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(json.loads(req.content))
        return httpx.Response(200, json={"data": [{"embedding": "AACAPw==", "index": 0}]})

    await mocked(handler, remote_model="jinaai/jina-embeddings-v5-text-small-text-matching").embed(["x"])
    assert seen == [
        {"input": ["x"], "model": "jinaai/jina-embeddings-v5-text-small-text-matching", "encoding_format": "base64"}
    ]


@pytest.mark.parametrize(
    ("status", "body", "error", "says"),
    [
        (400, {"object": "error", "message": "maximum context length is 8192 tokens"}, InputRejected, "8192"),
        (404, {"object": "error", "message": "The model `x` does not exist."}, BackendMisconfigured, "does not exist"),
        # OpenAI echoes part of the key in its 401 message: the adapter never repeats the server's text.
        (401, {"error": {"message": "Incorrect API key provided: sk-abc***"}}, BackendMisconfigured, "check api_key"),
        (429, {"error": {"message": "Rate limit reached"}}, BackendOverloaded, "Rate limit"),
        (413, {"error": {"message": "too big"}}, PayloadTooLarge, "too big"),
        (502, {"error": {"message": "bad gateway"}}, BackendUnavailable, "502"),
    ],
)
async def test_error_mapping(status: int, body: dict[str, object], error: type[Exception], says: str) -> None:
    a = mocked(lambda _req: httpx.Response(status, json=body, headers={"Retry-After": "1"}))
    with pytest.raises(error) as info:
        await a.embed(["x"])
    assert says in str(info.value) and "sk-abc" not in str(info.value)


async def test_health_checks_the_served_model(primary: LlamaCppProcess) -> None:
    good = OpenAICompatAdapter(
        OpenAIBackend.model_validate(openai_backend("o", primary.url, "m", remote_model=served_name(primary.url)))
    )
    assert (await good.health()).ok
    typo = OpenAICompatAdapter(
        OpenAIBackend.model_validate(openai_backend("o", primary.url, "m", remote_model="jina-typo"))
    )
    with pytest.raises(BackendMisconfigured, match="'jina-typo' is not served here"):
        await typo.health()
    await good.aclose()
    await typo.aclose()


def listing(*ids: str, **extra: object) -> dict[str, object]:
    return {"object": "list", "data": [{"id": i, "object": "model", **extra} for i in ids]}


def server(models: dict[str, object], prefix: str = "/v1") -> Callable[[httpx.Request], httpx.Response]:
    """An OpenAI-compatible server whose API lives under `prefix`; /health at the root."""

    def handle(req: httpx.Request) -> httpx.Response:
        path = req.url.path
        if path == "/health":
            return httpx.Response(200)
        if path == f"{prefix}/models":
            return httpx.Response(200, json=models)
        if path == f"{prefix}/embeddings":
            body = json.loads(req.content)
            data = [{"embedding": "AACAPw==", "index": i} for i in range(len(body["input"]))]
            return httpx.Response(200, json={"data": data, "model": body["model"], "usage": {"prompt_tokens": 99}})
        return httpx.Response(404, json={"detail": "Not Found"})

    return handle


def wired(kind: str, handler: Callable[[httpx.Request], httpx.Response], **kw: object) -> OpenAICompatAdapter:
    from backends import create_backend
    from config.settings import GatewaySettings

    settings = GatewaySettings.model_validate(
        {
            "models": [{"name": "minilm", "profile": "all-minilm-l6-v2"}],
            "backends": [openai_backend("o", "http://s.invalid", **kw) | {"kind": kind}],
        }
    )
    a = create_backend(settings.backends[0])
    assert isinstance(a, OpenAICompatAdapter)
    a._client = httpx.AsyncClient(base_url="http://s.invalid", transport=httpx.MockTransport(handler))
    a._poster = JsonPoster(a._client, "http://s.invalid", 1.0)
    return a


@pytest.mark.parametrize("kind", ["openai", "vllm", "infinity"])
async def test_the_one_served_model_is_discovered(kind: str) -> None:
    a = wired(kind, server(listing("org/all-MiniLM-L6-v2")))
    assert (await a.health()).ok and a.remote_model == "org/all-MiniLM-L6-v2"


async def test_the_gateway_name_wins_among_several_and_none_is_an_error_naming_them() -> None:
    named = wired("vllm", server(listing("other", "minilm")))
    await named.health()
    assert named.remote_model == "minilm"
    several = wired("vllm", server(listing("a", "b")))
    with pytest.raises(BackendMisconfigured, match=r"serves 2 models .* served: \['a', 'b'\] \(set remote_model"):
        await several.health()
    with pytest.raises(BackendMisconfigured, match=r"served: \['a', 'b'\]"):  # before any health check, too
        await wired("vllm", server(listing("a", "b"))).embed(["x"])


@pytest.mark.parametrize("prefix", ["", "/v1"])
async def test_infinity_is_found_with_or_without_url_prefix_and_its_usage_ignored(prefix: str) -> None:
    a = wired("infinity", server(listing("models/minilm-hf", stats={"batch_size": 16}), prefix))
    out = await a.embed(["x", "y"])  # discovers where the API is before the first call
    assert out.vectors.shape == (2, 1)  # its usage (characters, not tokens) is never read
    info = await a.describe()
    assert info.max_batch_size == 16 and a.public_url() == f"http://s.invalid{prefix}"


async def test_path_prefix_is_where_the_api_lives() -> None:
    seen: list[str] = []
    inner = server(listing("m"), prefix="/api/openai/v1")

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.url.path)
        return inner(req)

    a = wired("openai", handler, path_prefix="/api/openai/v1")
    await a.embed(["x"])
    assert seen == ["/api/openai/v1/models", "/api/openai/v1/embeddings"]


async def test_vllm_limit_from_its_model_list_and_no_server_truncation() -> None:
    bodies: list[dict[str, object]] = []
    inner = server(listing("minilm", max_model_len=256, root="/models/minilm"))

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/embeddings"):
            bodies.append(json.loads(req.content))
        return inner(req)

    a = wired("vllm", handler)
    info = await a.describe()
    assert (info.kind, info.max_input_tokens, info.model_id) == ("vllm", 256, "/models/minilm")
    await a.embed(["x"])
    assert bodies == [{"input": ["x"], "model": "minilm", "encoding_format": "base64"}]  # no truncate_prompt_tokens


@pytest.mark.parametrize(("given", "kept"), [("v1", "/v1"), ("/v1/", "/v1"), ("", ""), ("/", ""), ("/a/b", "/a/b")])
def test_path_prefix_spellings(given: str, kept: str) -> None:
    assert OpenAIBackend.model_validate(openai_backend("o", "http://x", path_prefix=given)).path_prefix == kept


def test_path_prefix_that_is_no_path_is_refused() -> None:
    with pytest.raises(ValueError, match="not a URL path"):
        OpenAIBackend.model_validate(openai_backend("o", "http://x", path_prefix="/v1?x=1"))


def test_decoding_orders_by_index_and_refuses_malformed_bodies() -> None:
    import base64

    import numpy as np

    from backends.errors import BadBackendOutput
    from backends.openai import decode_vectors

    b64 = base64.b64encode(np.asarray([0.5, 0.25], dtype="<f4").tobytes()).decode()
    body = {"data": [{"embedding": [3.0, 4.0], "index": 1}, {"embedding": b64, "index": 0}]}
    assert decode_vectors("b", json.dumps(body).encode(), 2).tolist() == [[0.5, 0.25], [3.0, 4.0]]
    unindexed = {"data": [{"embedding": [3.0, 4.0]}, {"embedding": [1.0, 2.0], "index": 0}]}
    assert decode_vectors("b", json.dumps(unindexed).encode(), 2).tolist() == [[3.0, 4.0], [1.0, 2.0]]
    for bad in (
        b"[1, 2]",
        b'{"data": {"embedding": [1.0]}}',
        b'{"data": [{"embedding": [1.0, 2.0]}]}',  # one vector for two inputs
        b'{"data": [{"embedding": [1.0, 2.0]}, {"embedding": [1.0]}]}',  # ragged
        b'{"data": [{"embedding": [1.0, "x"]}, {"embedding": [1.0, 2.0]}]}',
        b'{"data": [{"embedding": null}, {"embedding": [1.0, 2.0]}]}',
        b'{"data": [{"embedding": [[1.0], [2.0]]}, {"embedding": [[1.0], [2.0]]}]}',  # not (n, dim)
    ):
        with pytest.raises(BadBackendOutput):
            decode_vectors("b", bad, 2)
