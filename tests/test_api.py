"""End to end through the gateway to two real llama.cpp servers (primary and fallback)."""

from __future__ import annotations

import base64
import concurrent.futures
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from backends.managed.process import LlamaCppProcess
from tests.helpers import RunningGateway, cosines, direct_embeddings, llamacpp_backend, run_gateway, settings_for, unit

MODELS = [
    {"name": "minilm", "profile": "all-minilm-l6-v2"},
    # A Matryoshka + prompts variant of the same GGUF, to exercise slicing and prompt application.
    {
        "name": "minilm-mrl",
        "profile": "all-minilm-l6-v2",
        "matryoshka_dimensions": [64, 128],
        "prompts": {"query": "query: ", "document": "passage: "},
        "default_prompt_name": "document",
    },
]


@pytest.fixture(scope="module")
def gw(primary: LlamaCppProcess, fallback: LlamaCppProcess) -> Iterator[RunningGateway]:
    backends = []
    for model in ("minilm", "minilm-mrl"):
        backends.append(llamacpp_backend(f"{model}-primary", primary.url, model, 0, api_key="do-not-leak-me"))
        backends.append(llamacpp_backend(f"{model}-fallback", fallback.url, model, 1))
    with run_gateway(settings_for(backends, MODELS, max_body_bytes=200_000, max_inputs=64)) as g:
        yield g


def post(gw: RunningGateway, body: object, path: str = "/v1/embeddings", **kw: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        gw.url + path,
        content=content,
        headers={"content-type": "application/json", **kw.pop("headers", {})},
        timeout=30,
        **kw,
    )  # type: ignore[arg-type]


def vectors(resp: httpx.Response) -> np.ndarray:
    data = sorted(resp.json()["data"], key=lambda d: d["index"])
    return np.asarray([d["embedding"] for d in data], dtype=np.float32)


TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply today.", "naïve café ✓ 東京"]


def test_gateway_vectors_equal_direct_llamacpp(gw: RunningGateway, primary: LlamaCppProcess) -> None:
    r = post(gw, {"model": "minilm", "input": TEXTS, "encoding_format": "float"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "minilm"
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and all(d["object"] == "embedding" for d in body["data"])
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]
    got = vectors(r)
    assert got.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert cosines(got, direct_embeddings(primary.url, TEXTS)).min() >= 0.99999
    assert r.headers["x-embedding-backend"] == "minilm-primary"


def test_single_string_input(gw: RunningGateway) -> None:
    r = post(gw, {"model": "minilm", "input": "just one"})
    assert r.status_code == 200 and len(r.json()["data"]) == 1 and len(r.json()["data"][0]["embedding"]) == 384


def test_base64_decodes_to_exactly_the_float_response(gw: RunningGateway) -> None:
    floats = vectors(post(gw, {"model": "minilm", "input": TEXTS}))
    r = post(gw, {"model": "minilm", "input": TEXTS, "encoding_format": "base64"})
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]])
    assert decoded.dtype == np.float32
    # Two requests: llama.cpp's numerics vary slightly with what else shares its batch (health and
    # agreement probes run beside); bit-exactness of the two encodings is tested on one result below.
    assert cosines(decoded, floats).min() >= 0.99999


def test_base64_and_float_encode_the_same_float32_bits() -> None:
    from gateway.api.openai import render
    from gateway.pipeline import EmbedRequest
    from gateway.service import EmbedResult

    rng = np.random.default_rng(3)
    result = EmbedResult(rng.normal(size=(4, 384)).astype(np.float32), ("b",), 7)
    as_float = json.loads(render(result, EmbedRequest("m", ["x"] * 4, encoding="float")))
    as_b64 = json.loads(render(result, EmbedRequest("m", ["x"] * 4, encoding="base64")))
    floats = np.asarray([d["embedding"] for d in as_float["data"]], dtype=np.float32)
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in as_b64["data"]])
    np.testing.assert_array_equal(decoded, result.vectors)
    np.testing.assert_array_equal(floats, result.vectors)


def test_dimensions_slice_and_renormalize(gw: RunningGateway) -> None:
    full = vectors(post(gw, {"model": "minilm-mrl", "input": TEXTS}))
    cut = vectors(post(gw, {"model": "minilm-mrl", "input": TEXTS, "dimensions": 64}))
    assert cut.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-6)
    # Two calls: llama.cpp batches concurrent work (the gateway's own checks) with them, which moves a vector by
    # ~1e-4; a wrong slice or a missing renormalisation would be off by far more.
    np.testing.assert_allclose(cut, unit(full[:, :64]), atol=5e-4)


def test_prompt_applied_exactly_once(gw: RunningGateway, primary: LlamaCppProcess) -> None:
    q = vectors(post(gw, {"model": "minilm-mrl", "input": TEXTS, "prompt_name": "query"}))
    d = vectors(post(gw, {"model": "minilm-mrl", "input": TEXTS}))  # default prompt: document
    assert cosines(q, direct_embeddings(primary.url, ["query: " + t for t in TEXTS])).min() >= 0.99999
    assert cosines(d, direct_embeddings(primary.url, ["passage: " + t for t in TEXTS])).min() >= 0.99999
    assert cosines(q, d).max() < 0.999  # the prompt really changes the vector


def test_tei_embed_route(gw: RunningGateway, primary: LlamaCppProcess) -> None:
    r = post(gw, {"inputs": TEXTS, "truncate": True}, "/embed")
    assert r.status_code == 200, r.text
    got = np.asarray(r.json(), dtype=np.float32)
    assert got.shape == (3, 384) and r.headers["x-embedding-backend"] == "minilm-primary"
    assert cosines(got, direct_embeddings(primary.url, TEXTS)).min() >= 0.99999
    one = post(gw, {"inputs": "hi", "model": "minilm-mrl", "dimensions": 128, "prompt_name": "query"}, "/embed")
    assert np.asarray(one.json()).shape == (1, 128)


def test_request_id_echoed_or_generated(gw: RunningGateway) -> None:
    r = post(gw, {"model": "minilm", "input": "x"}, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = post(gw, {"model": "nope", "input": "x"}).headers["x-request-id"]
    assert len(generated) == 32 and generated != post(gw, {"model": "nope", "input": "x"}).headers["x-request-id"]


def test_models_ready_and_backends(gw: RunningGateway) -> None:
    models = httpx.get(gw.url + "/v1/models").json()
    assert {m["id"]: m["dimensions"] for m in models["data"]} == {"minilm": [384], "minilm-mrl": [64, 128, 384]}
    assert httpx.get(gw.url + "/health").json()["status"] == "ok"
    ready = httpx.get(gw.url + "/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    text = httpx.get(gw.url + "/v1/backends").text
    assert "do-not-leak-me" not in text
    entries = {b["name"]: b for b in json.loads(text)["data"]}
    p = entries["minilm-primary"]
    assert (
        p["kind"] == "llamacpp"
        and p["model"] == "minilm"
        and p["healthy"] is True
        and p["url"].startswith("http://127.0.0.1:")
    )
    assert p["last_error"] is None and p["last_latency_ms"] > 0 and p["failures"] == 0


def _sample(text: str, series: str) -> float:
    line = next((ln for ln in text.splitlines() if ln.startswith(series + " ")), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def test_metrics_count_what_happened(gw: RunningGateway) -> None:
    calls = 'embedding_gateway_backend_calls_total{backend="minilm-primary",outcome="ok"}'
    ok = 'embedding_gateway_requests_total{route="/v1/embeddings",status="200"}'
    bad = 'embedding_gateway_requests_total{route="/v1/embeddings",status="400"}'
    inputs = 'embedding_gateway_inputs_total{model="minilm"}'
    before = httpx.get(gw.url + "/metrics").text
    assert post(gw, {"model": "minilm", "input": ["count me", "and me", "and me too"]}).status_code == 200
    assert post(gw, {"model": "minilm", "input": [1, 2]}).status_code == 400
    after = httpx.get(gw.url + "/metrics").text
    assert _sample(after, ok) - _sample(before, ok) == 1
    assert _sample(after, bad) - _sample(before, bad) == 1
    assert _sample(after, inputs) - _sample(before, inputs) == 3  # texts served, not requests
    assert _sample(after, calls) - _sample(before, calls) >= 1


BAD_OPENAI = [
    ({"model": "minilm", "input": []}, 400, "empty"),
    ({"model": "minilm", "input": ""}, 400, "empty"),
    ({"model": "minilm", "input": ["ok", ""]}, 400, "input[1]"),
    ({"model": "minilm", "input": [1, 2, 3]}, 400, "token arrays are not supported"),
    ({"model": "minilm", "input": [[1, 2], [3]]}, 400, "token arrays are not supported"),
    ({"model": "minilm", "input": ["ok", {"a": 1}]}, 400, "must be a string"),
    ({"model": "minilm-mrl", "input": "x", "dimensions": 100}, 400, "allowed values: [64, 128, 384]"),
    ({"model": "minilm", "input": "x", "dimensions": "abc"}, 400, "dimensions"),
    ({"model": "nope", "input": "x"}, 404, "known models: ['minilm', 'minilm-mrl']"),
    ({"input": "x"}, 400, "`model` is required"),
    ({"model": "minilm-mrl", "input": "x", "prompt_name": "passage"}, 400, "['document', 'query']"),
    ({"model": "minilm", "input": "x", "encoding_format": "int8"}, 400, "use one of ['float', 'base64']"),
    ({"model": "minilm", "input": ["x"] * 65}, 400, "at most 64"),
    ({"model": "minilm", "input": "word " * 700}, 400, "Please reduce your prompt; or completion length."),
]


@pytest.mark.parametrize(("body", "status", "needle"), BAD_OPENAI)
def test_bad_input_openai_dialect(gw: RunningGateway, body: dict[str, object], status: int, needle: str) -> None:
    r = post(gw, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text


def test_malformed_json_and_oversized_body(gw: RunningGateway) -> None:
    r = post(gw, b'{"model": "minilm", "input": ')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    big = post(gw, {"model": "minilm", "input": ["x" * 1000] * 300})
    assert big.status_code == 413 and "max_body_bytes" in big.json()["error"]["message"]
    tei = post(gw, b"{oops", "/embed")
    assert tei.status_code == 400 and set(tei.json()) == {"error", "error_type"}
    # Chunked (no content-length) and over the limit: 413 as well, once the limit is crossed.
    chunks = iter([b'{"model": "minilm", "input": ["', b"x" * 300_000, b'"]}'])
    chunked = httpx.post(gw.url + "/v1/embeddings", content=chunks, headers={"content-type": "application/json"})
    assert chunked.status_code == 413


def test_other_methods_on_embedding_routes_are_405_in_dialect(gw: RunningGateway) -> None:
    openai = httpx.get(gw.url + "/v1/embeddings")
    assert openai.status_code == 405 and openai.headers["allow"] == "POST"
    assert openai.json()["error"]["code"] == "method_not_allowed"
    tei = httpx.put(gw.url + "/embed", json={"inputs": "x"})
    assert tei.status_code == 405 and set(tei.json()) == {"error", "error_type"}


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        ({"inputs": []}, 400, "Empty"),
        ({"inputs": "x", "normalize": False}, 400, "Validation"),
        ({"inputs": [5, 6]}, 400, "Validation"),
        ({"inputs": "x", "model": "nope"}, 404, "Validation"),
    ],
)
def test_bad_input_tei_dialect(gw: RunningGateway, body: dict[str, object], status: int, error_type: str) -> None:
    r = post(gw, body, "/embed")
    assert r.status_code == status and r.json()["error_type"] == error_type and r.json()["error"]


def test_bad_requests_do_not_disturb_good_ones(gw: RunningGateway) -> None:
    bodies = [
        {"model": "minilm", "input": f"good {i}"} if i % 2 else {"model": "minilm", "input": [i]} for i in range(40)
    ]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: post(gw, b), bodies))
    assert [r.status_code for r in results] == [400 if i % 2 == 0 else 200 for i in range(40)]


def test_unknown_route_answers_in_dialect(gw: RunningGateway) -> None:
    r = httpx.get(gw.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json() and r.headers["x-request-id"]
