"""Never drop what the client asked for: intent (task / input_type), output types, aliases, and the Cohere,
Voyage and Jina dialects — with the real Cohere, Voyage and LangChain clients against a real llama.cpp."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import cohere
import httpx
import numpy as np
import pytest
import voyageai
from langchain_openai import OpenAIEmbeddings

from backends.managed.process import LlamaCppProcess
from tests.helpers import RunningGateway, cosines, direct_embeddings, llamacpp_backend, run_gateway, settings_for

TEXTS = ["where is the nearest beach", "The sun sets behind the hills."]
PROMPTED = {
    "name": "minilm",
    "profile": "all-minilm-l6-v2",
    "prompts": {"query": "Query: ", "document": "Document: "},
    "default_prompt_name": "document",
    "aliases": [{"name": "minilm-query", "prompt": "query"}],
}


@pytest.fixture(scope="module")
def gw(primary: LlamaCppProcess) -> Iterator[RunningGateway]:
    with run_gateway(settings_for([llamacpp_backend("llama", primary.url)], [PROMPTED])) as running:
        yield running


def truth(primary: LlamaCppProcess, prefix: str) -> np.ndarray:
    return direct_embeddings(primary.url, [prefix + t for t in TEXTS])


def post(gw: RunningGateway, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", json=body, timeout=60)


def floats(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def int8_of(v: np.ndarray) -> np.ndarray:
    """The documented int8 range: clip(round(x * sqrt(d) * 127 / 4), -128, 127)."""
    return np.clip(np.rint(v.astype(np.float64) * np.sqrt(v.shape[1]) * 127 / 4), -128, 127).astype(np.int8)


def test_cohere_sdk_v2_gets_the_query_vector_in_every_type_asked(gw: RunningGateway, primary: LlamaCppProcess) -> None:
    co = cohere.ClientV2(api_key="unused", base_url=gw.url)
    out = co.embed(texts=TEXTS, model="minilm", input_type="search_query", embedding_types=["float", "int8", "ubinary"])
    f = np.asarray(out.embeddings.float_, dtype=np.float32)
    assert cosines(f, truth(primary, "Query: ")).min() >= 0.9999
    assert np.array_equal(np.asarray(out.embeddings.int8), int8_of(f))
    assert np.array_equal(np.asarray(out.embeddings.ubinary, dtype=np.uint8), np.packbits(f > 0, axis=-1))
    assert out.texts == TEXTS and out.meta is not None and out.meta.billed_units.input_tokens > 0
    doc = co.embed(texts=TEXTS, model="minilm", input_type="search_document", embedding_types=["float"])
    assert cosines(np.asarray(doc.embeddings.float_), truth(primary, "Document: ")).min() >= 0.9999


def test_cohere_v1_and_errors_in_cohere_shape(gw: RunningGateway) -> None:
    r = post(gw, "/v1/embed", {"texts": TEXTS, "model": "minilm", "input_type": "search_query"})
    assert r.status_code == 200 and r.json()["response_type"] == "embeddings_floats"
    assert np.asarray(r.json()["embeddings"]).shape == (2, 384)
    bad = post(gw, "/v2/embed", {"texts": TEXTS, "model": "minilm", "input_type": "code.query"})
    assert bad.status_code == 400 and set(bad.json()) == {"message"}
    assert "search_query" in bad.json()["message"]  # the allowed values are listed
    assert post(gw, "/v2/embed", {"texts": TEXTS, "model": "nope"}).status_code == 404
    typo = post(gw, "/v2/embed", {"texts": TEXTS, "model": "minilm", "embeding_types": ["int8"]})
    assert typo.status_code == 400 and "`embeding_types`" in typo.json()["message"]


def test_voyage_sdk_input_type_and_binary_output(gw: RunningGateway, primary: LlamaCppProcess) -> None:
    vo = voyageai.Client(api_key="unused", base_url=f"{gw.url}/v1", max_retries=0)
    q = vo.embed(TEXTS, model="minilm", input_type="query")
    assert cosines(np.asarray(q.embeddings), truth(primary, "Query: ")).min() >= 0.9999
    bits = vo.embed(TEXTS, model="minilm", input_type="query", output_dtype="binary")
    signs = (np.packbits(np.asarray(q.embeddings) > 0, axis=-1).astype(np.int16) - 128).astype(np.int8)
    assert np.array_equal(np.asarray(bits.embeddings, dtype=np.int8), signs)
    # Without /v1 in the base URL the SDK posts to /embeddings: served too.
    bare = voyageai.Client(api_key="unused", base_url=gw.url, max_retries=0).embed(TEXTS, model="minilm")
    assert cosines(np.asarray(bare.embeddings), truth(primary, "Document: ")).min() >= 0.9999


def test_jina_body_task_objects_and_binary(gw: RunningGateway, primary: LlamaCppProcess) -> None:
    items = [{"text": t} for t in TEXTS]
    q = floats(post(gw, "/v1/embeddings", {"model": "minilm", "input": items, "task": "retrieval.query"}))
    assert cosines(q, truth(primary, "Query: ")).min() >= 0.9999
    r = post(
        gw, "/v1/embeddings", {"model": "minilm", "input": items, "task": "retrieval.query", "embedding_type": "binary"}
    )
    assert r.status_code == 200
    bits = np.asarray([d["embedding"] for d in r.json()["data"]], dtype=np.int8)
    assert np.array_equal(bits, (np.packbits(q > 0, axis=-1).astype(np.int16) - 128).astype(np.int8))
    b64 = post(
        gw, "/v1/embeddings", {"model": "minilm", "input": TEXTS, "task": "retrieval.query", "embedding_type": "base64"}
    )
    decoded = np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, q[0])
    for field, value, why in (
        ("normalized", False, "normalized=false"),
        ("late_chunking", True, "late_chunking"),
        ("task", "code.query", "allowed values"),
    ):
        bad = post(gw, "/v1/embeddings", {"model": "minilm", "input": items, field: value})
        assert bad.status_code == 400 and why in bad.json()["error"]["message"], bad.text
        assert bad.json()["error"]["param"] == field
    image = post(gw, "/v1/embeddings", {"model": "minilm", "input": [{"image": "https://x/y.png"}]})
    assert image.status_code == 400 and "text only" in image.json()["error"]["message"]


def test_intent_is_never_dropped(gw: RunningGateway, primary: LlamaCppProcess) -> None:
    query = truth(primary, "Query: ")
    for body in ({"input_type": "query"}, {"input_type": "search_query"}, {"prompt_name": "query"}):
        got = floats(post(gw, "/v1/embeddings", {"model": "minilm", "input": TEXTS, **body}))
        assert cosines(got, query).min() >= 0.9999, body
    both = post(
        gw, "/v1/embeddings", {"model": "minilm", "input": TEXTS, "prompt_name": "document", "input_type": "query"}
    )
    assert both.status_code == 400 and "contradicts" in both.json()["error"]["message"]
    ints = post(
        gw, "/v1/embeddings", {"model": "minilm", "input": TEXTS, "input_type": "query", "output_dtype": "int8"}
    )
    assert np.array_equal(
        np.asarray([d["embedding"] for d in ints.json()["data"]], dtype=np.int8), int8_of(query_of(gw))
    )


def query_of(gw: RunningGateway) -> np.ndarray:
    return floats(post(gw, "/v1/embeddings", {"model": "minilm", "input": TEXTS, "input_type": "query"}))


def test_unknown_fields_are_refused_naming_them(gw: RunningGateway, primary: LlamaCppProcess) -> None:
    r = post(gw, "/v1/embeddings", {"model": "minilm", "input": TEXTS, "dimension": 128, "colour": 1})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "dimension" and "`dimension`" in err["message"] and "`colour`" in err["message"]
    tei = httpx.post(f"{gw.url}/embed", json={"inputs": "x", "normalise": True}, timeout=30)
    assert tei.status_code == 400 and "`normalise`" in tei.json()["error"]
    lenient = settings_for([llamacpp_backend("llama", primary.url)], [PROMPTED], unknown_fields="ignore")
    with run_gateway(lenient) as other:
        assert post(other, "/v1/embeddings", {"model": "minilm", "input": TEXTS, "dimension": 128}).status_code == 200


def test_an_alias_gives_frameworks_the_query_prompt(gw: RunningGateway, primary: LlamaCppProcess) -> None:
    listed = {m["id"]: m for m in httpx.get(f"{gw.url}/v1/models").json()["data"]}
    assert listed["minilm-query"]["alias_of"] == "minilm" and listed["minilm-query"]["default_prompt_name"] == "query"
    assert listed["minilm"]["space_id"] == listed["minilm-query"]["space_id"]
    lc = OpenAIEmbeddings(
        model="minilm-query",
        base_url=f"{gw.url}/v1",
        api_key="unused",
        check_embedding_ctx_length=False,  # type: ignore[arg-type]
    )
    q = np.asarray([lc.embed_query(t) for t in TEXTS], dtype=np.float32)
    assert cosines(q, truth(primary, "Query: ")).min() >= 0.9999
    r = post(gw, "/v1/embeddings", {"model": "minilm-query", "input": TEXTS})
    assert r.json()["model"] == "minilm-query"
    # An explicit prompt still wins over the alias's default.
    doc = floats(post(gw, "/v1/embeddings", {"model": "minilm-query", "input": TEXTS, "input_type": "document"}))
    assert cosines(doc, truth(primary, "Document: ")).min() >= 0.9999
