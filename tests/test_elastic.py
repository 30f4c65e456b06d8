"""The Elastic adapter, through the official elasticsearch client, against the ES test server."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest

from backends.elastic import ElasticAdapter
from backends.errors import (
    BackendMisconfigured,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    BadBackendOutput,
    InputRejected,
)
from backends.managed.process import LlamaCppProcess, free_port
from config.backends import ElasticBackend
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
from tests.servers.elastic import ElasticServer

EsFactory = Callable[..., tuple[str, ElasticServer]]
EIS_PROMPTS = {"search": "query: ", "ingest": "passage: "}  # what the service applies per input_type


def es_backend(name: str, url: str, model: str = "minilm", **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "elastic", "model": model, "url": url, "inference_id": "eis-minilm", **kw}


def adapter(url: str, **kw: Any) -> ElasticAdapter:
    return ElasticAdapter(ElasticBackend.model_validate(es_backend("es", url, "m", **kw)))


def test_vectors_equal_llamacpp_with_input_types(es_factory: EsFactory, primary: LlamaCppProcess) -> None:
    url, server = es_factory(prompts=EIS_PROMPTS, api_key="ZXM6a2V5")
    backends = [
        es_backend("eis", url, "minilm", api_key="ZXM6a2V5"),
        es_backend("eis-mrl", url, "minilm-mrl", api_key="ZXM6a2V5"),
    ]
    with run_gateway(settings_for(backends, [MINILM, MINILM_MRL])) as gw:
        single = embed(gw, "minilm", "one sentence")
        assert single.headers["x-embedding-backend"] == "eis"
        assert cosines(vectors_of(single), direct_embeddings(primary.url, ["one sentence"])).min() >= 0.99999
        docs = vectors_of(embed(gw, "minilm-mrl", TEXTS))
        queries = vectors_of(embed(gw, "minilm-mrl", TEXTS, prompt_name="query", dimensions=128))
    assert cosines(docs, direct_embeddings(primary.url, ["passage: " + t for t in TEXTS])).min() >= 0.99999
    full_q = direct_embeddings(primary.url, ["query: " + t for t in TEXTS])
    assert queries.shape == (3, 128) and cosines(queries, unit(full_q[:, :128])).min() >= 0.99999
    sent = traffic(server)
    # minilm has no prompts: no input_type; minilm-mrl maps document->ingest, query->search; texts stay plain.
    assert [s.get("input_type") for s in sent] == [None, "ingest", "search"]
    assert sent[1]["input"] == TEXTS and sent[2]["input"] == TEXTS
    # It really was the official client talking.
    assert all("elasticsearch-py" in r.headers.get("user-agent", "") for r in server.received)


async def test_older_clients_without_input_type_kwarg_use_perform_request(
    es_factory: EsFactory, primary: LlamaCppProcess
) -> None:
    url, server = es_factory(prompts=EIS_PROMPTS)
    a = adapter(url)
    a._native_input_type = False  # as on elasticsearch-py < 8.19.2 / 9.1.2
    out = await a.embed(TEXTS, "query")
    assert cosines(out.vectors, direct_embeddings(primary.url, ["query: " + t for t in TEXTS])).min() >= 0.99999
    assert traffic(server)[-1] == {"input": TEXTS, "input_type": "search"}
    await a.aclose()


def es_error(status: int, reason: str, etype: str = "status_exception") -> bytes:
    return json.dumps({"error": {"type": etype, "reason": reason}, "status": status}).encode()


UPSTREAM_500 = "Received a server error status code for request from inference entity id [eis-minilm] status [500]"
FAULTS = [
    (Fault("latency", seconds=3), BackendTimeout),
    (Fault("status", 429, es_error(429, "Received a rate limit status code"), {"Retry-After": "4"}), BackendOverloaded),
    (Fault("status", 408, es_error(408, "Request timed out after [30s]")), BackendTimeout),
    (Fault("status", 400, es_error(400, UPSTREAM_500)), BackendUnavailable),
    (Fault("status", 503, b'{"error":{"type":"unavailable","reason":"no master"},"status":503}'), BackendUnavailable),
    (Fault("status", 500, b'{"error":{"type":"exception","reason":"boom"},"status":500}'), BackendUnavailable),
    (Fault("drop"), BackendUnavailable),
    (Fault("malformed"), BadBackendOutput),
    (Fault("wrong_count"), BadBackendOutput),
]


@pytest.mark.parametrize(
    ("fault", "error"), FAULTS, ids=lambda x: f"{getattr(x, 'kind', '')}{getattr(x, 'status', '')}"
)
async def test_fault_maps_to_error_class(es_factory: EsFactory, fault: Fault, error: type[Exception]) -> None:
    url, server = es_factory()
    a = adapter(url, timeout_s=1.0)
    server.inject(fault)
    with pytest.raises(error) as info:
        await a.embed(["hello", "world"])
    if isinstance(info.value, BackendOverloaded):
        assert info.value.retry_after == 4.0
    assert (await a.embed(["hello"])).vectors.shape == (1, 384)
    await a.aclose()


@pytest.mark.parametrize(
    "fault",
    [f for f, _ in FAULTS] + [Fault("nan"), Fault("wrong_dimension", dimension=100)],
    ids=lambda f: f.kind + str(f.status),
)
def test_faulty_elastic_falls_back_without_the_client_seeing_it(
    es_factory: EsFactory, fallback: LlamaCppProcess, fault: Fault
) -> None:
    url, server = es_factory()
    backends = [es_backend("eis", url, timeout_s=1.0), llamacpp_backend("llama", fallback.url, priority=1)]
    if fault.kind == "latency":  # past any bound the gateway learns from this backend's times (issue 18)
        fault = dataclasses.replace(fault, seconds=8)
    with run_gateway(settings_for(backends)) as gw:
        server.inject(fault)
        r = embed(gw, "minilm", TEXTS)
        assert r.status_code == 200 and r.headers["x-embedding-backend"] == "llama"


async def test_missing_endpoint_wrong_key_and_bad_input(es_factory: EsFactory) -> None:
    url, _ = es_factory(api_key="cmlnaHQ6a2V5")
    missing = adapter(url, api_key="cmlnaHQ6a2V5", inference_id="nope")
    with pytest.raises(BackendMisconfigured, match="'nope' not found"):
        await missing.health()
    wrong = adapter(url, api_key="d3Jvbmc6a2V5")
    with pytest.raises(BackendMisconfigured, match="authentication failed") as info:
        await wrong.embed(["x"])
    assert "d3Jvbmc6a2V5" not in str(info.value)
    right = adapter(url, api_key="cmlnaHQ6a2V5")
    with pytest.raises(InputRejected, match="cannot be an empty array"):
        await right.embed([])
    info2 = await right.describe()
    assert (info2.model_id, info2.dimension, info2.extra["similarity"]) == ("all-minilm-l6-v2", 384, "cosine")
    assert "applied by the service" in str(info2.extra["prompt"])
    for a in (missing, wrong, right):
        await a.aclose()


async def test_not_elasticsearch_is_misconfigured(tei_factory: Callable[..., Any]) -> None:
    url, _ = tei_factory()  # a TEI server answers without X-Elastic-Product
    a = adapter(url)
    with pytest.raises(BackendMisconfigured, match="not Elasticsearch"):
        await a.health()
    await a.aclose()


def test_misconfigured_backends_log_once_and_say_why(
    es_factory: EsFactory, tei_factory: Callable[..., Any], primary: LlamaCppProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Wrong URL, wrong key, missing endpoint: one log line each, a clear /v1/backends entry, no secrets."""
    es_url, _ = es_factory(api_key="Z29vZDprZXk=")
    tei_url, _ = tei_factory(api_key="tei-right")
    backends = [
        llamacpp_backend("wrong-url", f"http://user:pw-in-url@127.0.0.1:{free_port()}", priority=0),
        {
            "name": "wrong-key",
            "kind": "tei",
            "model": "minilm",
            "url": tei_url,
            "api_key": "tei-WRONG-secret",
            "priority": 1,
        },
        es_backend("no-endpoint", es_url, api_key="Z29vZDprZXk=", inference_id="missing-endpoint", priority=2),
        llamacpp_backend("good", primary.url, priority=3),
    ]
    caplog.set_level(logging.INFO)
    # The reference defines the space; it must be one that works (the others cannot be verified).
    models = [{**MINILM, "reference": "good"}]
    with run_gateway(settings_for(backends, models), wait_ready=True) as gw:
        for _ in range(15):
            r = embed(gw, "minilm", "x")
            assert r.status_code == 200 and r.headers["x-embedding-backend"] == "good"
        entries = {b["name"]: b for b in gw.client().get("/v1/backends").json()["data"]}
        listing = gw.client().get("/v1/backends").text
    assert "connection failed" in entries["wrong-url"]["last_error"]
    assert entries["wrong-url"]["url"].startswith("http://127.0.0.1:") and "pw-in-url" not in listing
    assert "check api_key" in entries["wrong-key"]["last_error"]
    assert "'missing-endpoint' not found" in entries["no-endpoint"]["last_error"]
    for name in ("wrong-url", "wrong-key", "no-endpoint"):
        lines = [r for r in caplog.records if r.levelno >= logging.WARNING and f"backend {name} " in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]
    text = caplog.text + listing
    for secret in ("tei-WRONG-secret", "Z29vZDprZXk=", "pw-in-url", "tei-right"):
        assert secret not in text
    assert "Traceback" not in caplog.text
