"""TEI's clients and Elasticsearch's inference services, calling the gateway the way they really do (issue 12,
items 4-6): huggingface_hub, another gateway using this one as a `tei` backend, and the exact bodies and
headers of Elasticsearch's `openai` and `hugging_face` services, answers parsed the way ES parses them."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import numpy as np
import pytest

from backends.managed.process import LlamaCppProcess
from tests.helpers import cosines, direct_embeddings, llamacpp_backend, run_gateway, settings_for

TOO_LONG = "word " * 700  # more tokens than the llama.cpp test servers' physical batch


@pytest.fixture(scope="module")
def gw_b(primary: LlamaCppProcess) -> Any:
    with run_gateway(settings_for([llamacpp_backend("llama", primary.url)])) as gw:
        yield gw


def test_info_and_root_route_as_tei_serves_them(gw_b: Any) -> None:
    info = httpx.get(f"{gw_b.url}/info").json()
    assert info["model_id"] == "minilm" and "embedding" in info["model_type"]
    assert info["max_client_batch_size"] > 0 and info["max_input_length"] > 0 and info["auto_truncate"] is False
    for path in ("/", "/embed", "/invocations"):
        r = httpx.post(f"{gw_b.url}{path}", json={"inputs": ["a", "b"]})
        assert r.status_code == 200 and np.asarray(r.json()).shape == (2, 384), path
    bad = httpx.post(f"{gw_b.url}/", json={"inputs": []})
    assert bad.status_code == 400 and set(bad.json()) == {"error", "error_type"}


def test_huggingface_hub_inference_client(gw_b: Any, primary: LlamaCppProcess) -> None:
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=gw_b.url)
    got = np.asarray(client.feature_extraction("The sun sets behind the hills."), dtype=np.float32).reshape(1, -1)
    want = direct_embeddings(primary.url, ["The sun sets behind the hills."])
    assert got.shape == (1, 384) and cosines(got, want).min() > 0.9999


def test_a_gateway_uses_another_gateway_as_a_tei_backend(gw_b: Any, primary: LlamaCppProcess) -> None:
    settings = settings_for([{"name": "upstream", "kind": "tei", "model": "minilm", "url": gw_b.url}])
    with run_gateway(settings) as gw_a:
        backends = httpx.get(f"{gw_a.url}/v1/backends").json()["data"]
        assert backends[0]["healthy"] and backends[0]["agreement"] == "reference"
        r = httpx.post(f"{gw_a.url}/v1/embeddings", json={"model": "minilm", "input": ["one", "two"]})
        assert r.status_code == 200 and r.headers["x-embedding-backend"] == "upstream"
        got = np.asarray([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        assert cosines(got, direct_embeddings(primary.url, ["one", "two"])).min() > 0.9999
        # A too-long input upstream stays a client error (413 from B's TEI route → 400 here), not a backend fault.
        long = httpx.post(f"{gw_a.url}/v1/embeddings", json={"model": "minilm", "input": TOO_LONG})
        assert long.status_code == 400 and "reduce your prompt" in long.json()["error"]["message"]
        assert httpx.get(f"{gw_a.url}/v1/backends").json()["data"][0]["circuit"] == "closed"


def _es_openai(url: str, texts: list[str], **extra: Any) -> httpx.Response:
    """As x-pack's OpenAiEmbeddingsRequest sends it."""
    body = {"input": texts, "model": "minilm", **extra}
    headers = {"Content-Type": "application/json", "Authorization": "Bearer es-inference-key"}
    return httpx.post(f"{url}/v1/embeddings", json=body, headers=headers, timeout=30)


def _es_parse_openai(r: httpx.Response) -> np.ndarray:
    """As OpenAiEmbeddingsResponseEntity parses it: only data[].embedding, in order; base64 strictly."""
    rows = []
    for item in r.json()["data"]:
        e = item["embedding"]
        rows.append(np.frombuffer(base64.b64decode(e, validate=True), "<f4") if isinstance(e, str) else e)
    return np.asarray(rows, dtype=np.float32)


def test_elasticsearch_openai_service(gw_b: Any, primary: LlamaCppProcess) -> None:
    texts = ["first document", "second document"]
    want = direct_embeddings(primary.url, texts)
    for extra in ({}, {"encoding_format": "base64"}, {"user": "es-user", "encoding_format": "base64"}):
        r = _es_openai(gw_b.url, texts, **extra)
        assert r.status_code == 200, r.text
        assert cosines(_es_parse_openai(r), want).min() > 0.9999
    # Too long: a 400 whose message has the words OpenAiResponseHandler looks for (then ES truncates, retries).
    r = _es_openai(gw_b.url, ["short", TOO_LONG], encoding_format="base64")
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "Please reduce your prompt; or completion length." in message and "too long" in message.lower()


def test_elasticsearch_hugging_face_service(gw_b: Any, primary: LlamaCppProcess) -> None:
    """HuggingFaceRequest: {"inputs": [...]} with a Bearer key to the configured URL (often TEI's root)."""
    headers = {"Content-Type": "application/json", "Authorization": "Bearer es-inference-key"}
    r = httpx.post(f"{gw_b.url}/", json={"inputs": ["a text"]}, headers=headers)
    assert r.status_code == 200
    parsed = r.json()
    vectors = np.asarray(parsed["embeddings"] if isinstance(parsed, dict) else parsed, dtype=np.float32)
    assert cosines(vectors, direct_embeddings(primary.url, ["a text"])).min() > 0.9999
    # Too long: 413, the only status HuggingFaceResponseHandler truncates and retries on; TEI's error shape.
    long = httpx.post(f"{gw_b.url}/", json={"inputs": [TOO_LONG]}, headers=headers)
    assert long.status_code == 413 and long.json()["error_type"] == "Validation"
    assert "too long" in long.json()["error"].lower()
