"""The TEI adapter against the contract-faithful TEI test server (vectors from real llama.cpp)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from backends.errors import (
    BackendMisconfigured,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    BadBackendOutput,
    InputRejected,
    PayloadTooLarge,
)
from backends.managed.process import LlamaCppProcess
from backends.tei import TeiAdapter
from config.backends import TeiBackend
from tests.helpers import (
    MINILM,
    MINILM_MRL,
    TEXTS,
    cosines,
    direct_embeddings,
    embed,
    llamacpp_backend,
    run_gateway,
    settings_for,
    unit,
    vectors_of,
)
from tests.servers.base import Fault, traffic
from tests.servers.tei import TeiServer

TeiFactory = Callable[..., tuple[str, TeiServer]]
PROMPTS = {"query": "query: ", "document": "passage: "}


def tei_backend(name: str, url: str, model: str = "minilm", **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "tei", "model": model, "url": url, **kw}


def adapter(url: str, **kw: Any) -> TeiAdapter:
    return TeiAdapter(TeiBackend.model_validate({"name": "tei", "kind": "tei", "model": "m", "url": url, **kw}))


def test_vectors_equal_llamacpp_single_batched_and_sliced(tei_factory: TeiFactory, primary: LlamaCppProcess) -> None:
    url, server = tei_factory(prompts=PROMPTS)
    backends = [tei_backend("tei-gpu", url, "minilm"), tei_backend("tei-gpu-mrl", url, "minilm-mrl")]
    with run_gateway(settings_for(backends, [MINILM, MINILM_MRL])) as gw:
        single = embed(gw, "minilm", "one sentence")
        assert single.headers["x-embedding-backend"] == "tei-gpu"
        assert cosines(vectors_of(single), direct_embeddings(primary.url, ["one sentence"])).min() >= 0.99999
        many = [f"sentence {i} about topic {i % 7}" for i in range(45)]  # > max_client_batch_size (32)
        got = vectors_of(embed(gw, "minilm", many))
        assert got.shape == (45, 384)
        assert cosines(got, direct_embeddings(primary.url, many)).min() >= 0.99999
        sliced = vectors_of(embed(gw, "minilm-mrl", TEXTS, dimensions=64))
        full = direct_embeddings(primary.url, ["passage: " + t for t in TEXTS])
        assert sliced.shape == (3, 64)
        assert cosines(sliced, unit(full[:, :64])).min() >= 0.99999
    # The gateway never asked TEI to add a prompt, cut dimensions or truncate.
    bodies = traffic(server)
    assert bodies and all("prompt_name" not in b and "dimensions" not in b for b in bodies)
    assert all(b["truncate"] is False for b in bodies)
    assert max(len(b["inputs"]) for b in bodies) == 32


def test_prompt_mode_backend_lets_tei_apply_the_prompt(tei_factory: TeiFactory, primary: LlamaCppProcess) -> None:
    url, server = tei_factory(prompts=PROMPTS)
    backends = [tei_backend("tei", url, "minilm-mrl", prompt_mode="backend")]
    with run_gateway(settings_for(backends, [MINILM_MRL])) as gw:
        q = vectors_of(embed(gw, "minilm-mrl", TEXTS, prompt_name="query"))
        d = vectors_of(embed(gw, "minilm-mrl", TEXTS))
    assert cosines(q, direct_embeddings(primary.url, ["query: " + t for t in TEXTS])).min() >= 0.99999
    assert cosines(d, direct_embeddings(primary.url, ["passage: " + t for t in TEXTS])).min() >= 0.99999
    sent = traffic(server)
    assert [s["prompt_name"] for s in sent] == ["query", "document"]
    assert all(s["inputs"] == TEXTS for s in sent)  # plain texts: the gateway added nothing


FAULTS = [
    (Fault("latency", seconds=3), BackendTimeout),
    (
        Fault("status", 429, b'{"error":"Model is overloaded","error_type":"Overloaded"}', {"Retry-After": "2"}),
        BackendOverloaded,
    ),
    (Fault("status", 503, b'{"error":"unhealthy","error_type":"Unhealthy"}'), BackendUnavailable),
    (Fault("status", 424, b'{"error":"Backend error: CUDA OOM","error_type":"Backend"}'), BackendUnavailable),
    (Fault("status", 500, b"internal"), BackendUnavailable),
    (Fault("status", 413, b"Failed to buffer the request body: length limit exceeded"), PayloadTooLarge),
    (Fault("drop"), BackendUnavailable),
    (Fault("malformed"), BadBackendOutput),
    (Fault("wrong_count"), BadBackendOutput),
    (Fault("nan"), BadBackendOutput),
]


@pytest.mark.parametrize(
    ("fault", "error"), FAULTS, ids=lambda x: getattr(x, "kind", "") + str(getattr(x, "status", ""))
)
async def test_fault_maps_to_error_class(tei_factory: TeiFactory, fault: Fault, error: type[Exception]) -> None:
    url, server = tei_factory()
    a = adapter(url, timeout_s=1.0)
    server.inject(fault)
    with pytest.raises(error) as info:
        await a.embed(["hello", "world"])
    if isinstance(info.value, BackendOverloaded):
        assert info.value.retry_after == 2.0
    assert (await a.embed(["hello"])).vectors.shape == (1, 384)  # the next call is fine again
    await a.aclose()


@pytest.mark.parametrize(
    "fault",
    [f for f, _ in FAULTS] + [Fault("wrong_dimension", dimension=256)],
    ids=lambda f: f.kind + str(f.status),
)
def test_faulty_tei_falls_back_without_the_client_seeing_it(
    tei_factory: TeiFactory, fallback: LlamaCppProcess, fault: Fault
) -> None:
    url, server = tei_factory()
    backends = [tei_backend("tei", url, timeout_s=1.0), llamacpp_backend("llama", fallback.url, priority=1)]
    if fault.kind == "latency":  # past any bound the gateway learns from this backend's times (issue 18)
        fault = dataclasses.replace(fault, seconds=8)
    with run_gateway(settings_for(backends)) as gw:
        server.inject(fault)
        r = embed(gw, "minilm", TEXTS)
        assert r.status_code == 200 and r.headers["x-embedding-backend"] == "llama"
        assert cosines(vectors_of(r), direct_embeddings(fallback.url, TEXTS)).min() >= 0.99999


@pytest.mark.parametrize("version", ["1.9.3", "1.8.2"])
async def test_too_long_input_is_input_rejected_on_old_and_new_tei(tei_factory: TeiFactory, version: str) -> None:
    url, _ = tei_factory(version=version)
    a = adapter(url)
    with pytest.raises(InputRejected, match="less than 256 tokens") as info:
        await a.embed(["word " * 300])
    assert info.value.status == (422 if version == "1.9.3" else 413)
    await a.aclose()


async def test_batch_size_error_is_not_blamed_on_the_input(tei_factory: TeiFactory) -> None:
    url, _ = tei_factory(max_client_batch_size=4)
    a = adapter(url)
    with pytest.raises(PayloadTooLarge, match="batch size 10 > maximum allowed batch size 4"):
        await a.embed([f"t{i}" for i in range(10)])
    assert (await a.describe()).max_batch_size == 4
    await a.aclose()


def test_router_fits_sub_batches_to_learned_and_stale_limits(tei_factory: TeiFactory, primary: LlamaCppProcess) -> None:
    url, server = tei_factory(max_client_batch_size=4)
    texts = [f"text number {i}" for i in range(10)]
    with run_gateway(settings_for([tei_backend("tei", url)])) as gw:
        got = vectors_of(embed(gw, "minilm", texts))  # limit learned from /info: sub-batches of 4
        assert cosines(got, direct_embeddings(primary.url, texts)).min() >= 0.99999
        server.config.max_client_batch_size = 3  # the server changed under us: 413/422, halve, succeed
        got = vectors_of(embed(gw, "minilm", texts))
        assert cosines(got, direct_embeddings(primary.url, texts)).min() >= 0.99999
    assert max(len(b["inputs"]) for b in traffic(server)) <= 4


async def test_wrong_api_key_is_misconfigured(tei_factory: TeiFactory) -> None:
    url, _ = tei_factory(api_key="tei-secret")
    good, bad = adapter(url, api_key="tei-secret"), adapter(url, api_key="nope-key")
    assert (await good.health()).ok and (await good.embed(["x"])).vectors.shape == (1, 384)
    with pytest.raises(BackendMisconfigured, match="check api_key") as info:
        await bad.health()
    assert "nope-key" not in str(info.value)
    with pytest.raises(BackendMisconfigured):
        await bad.embed(["x"])
    await good.aclose()
    await bad.aclose()


def test_url_credentials_are_sent_as_basic_auth_and_never_shown(
    tei_factory: TeiFactory, primary: LlamaCppProcess
) -> None:
    """`url = "http://user:pass@host"` (a proxy with Basic auth in front of TEI) serves; before issue 17 every
    call failed in aiohttp ("Cannot combine AUTHORIZATION header with credentials in URL")."""
    url, _server = tei_factory(basic_auth="svc:p@ss w0rd")
    with_credentials = url.replace("http://", "http://svc:p%40ss%20w0rd@")
    settings = settings_for([tei_backend("t", with_credentials)])
    with run_gateway(settings) as gw, gw.client() as c:
        r = c.post("/v1/embeddings", json={"model": "minilm", "input": ["a", "b"]})
        assert r.status_code == 200, r.text
        assert cosines(vectors_of(r), direct_embeddings(primary.url, ["a", "b"])).min() >= 0.99999
        view = c.get("/v1/backends").text
        assert "p%40ss" not in view and "svc:" not in view and url.removeprefix("http://") in view
    wrong, _ = tei_factory(basic_auth="svc:other")
    with (
        run_gateway(
            settings_for([tei_backend("t", wrong.replace("http://", "http://svc:nope@"))]), wait_ready=False
        ) as gw,
        gw.client() as c,
    ):
        assert c.post("/v1/embeddings", json={"model": "minilm", "input": "a"}).status_code == 503


async def test_describe_reads_info(tei_factory: TeiFactory) -> None:
    url, _ = tei_factory(pooling="last_token", max_input_length=512, model_id="jinaai/x")
    info = await adapter(url).describe()
    assert (info.kind, info.model_id, info.pooling, info.max_input_tokens, info.max_batch_size) == (
        "tei",
        "jinaai/x",
        "last",
        512,
        32,
    )
    assert info.extra["version"] == "1.9.3"


def test_contract_server_rejects_what_real_tei_rejects(tei_factory: TeiFactory) -> None:
    """The stand-in is only useful if it is as strict as TEI: check it against the contract."""
    import httpx

    url, server = tei_factory()
    assert httpx.post(f"{url}/embed", json={"inputs": []}).json() == {
        "error": "`inputs` cannot be empty",
        "error_type": "Empty",
    }
    assert httpx.post(f"{url}/embed", content=b"{bad", headers={"content-type": "application/json"}).status_code == 400
    assert httpx.post(f"{url}/embed", content=b'{"inputs":"x"}').status_code == 415
    wrong_type = httpx.post(f"{url}/embed", json={"inputs": "x", "normalize": "yes"})
    assert wrong_type.status_code == 422 and "Failed to deserialize" in wrong_type.text
    assert server.violations  # that one was recorded as a contract violation...
    server.violations.clear()  # ...on purpose, here
    ok = httpx.post(f"{url}/embed", json={"inputs": "x", "dimensions": 8})
    assert np.asarray(ok.json()).shape == (1, 8)


async def test_tokenize_for_the_checker(tei_factory: TeiFactory, primary: LlamaCppProcess) -> None:
    # TEI's /tokenize (contract-checked by the stand-in) gives the ids of the text as sent, specials included.
    url, _ = tei_factory()
    ids = await adapter(url).tokenize("hello there")
    assert ids == [101, 7592, 2045, 102]  # [CLS] hello there [SEP]
