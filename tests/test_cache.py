"""The embedding cache (issue 13): keyed by (space, prompt, text); partial hits; one entry serves every
dimension and encoding; only verified vectors; shared through a real Redis; Redis down is never an error."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

from backends.managed.process import LlamaCppProcess
from config.cache import CacheSettings
from gateway.cache.store import EmbeddingCache, cache_key
from gateway.consistency.report import Verdict
from gateway.metrics import Metrics
from gateway.pipeline import Prompt
from tests.conftest import RedisServer
from tests.helpers import cli_gateway, llamacpp_backend, run_gateway, settings_for, wait_until
from tests.servers.base import is_probe
from tests.servers.tei import TeiServer

TeiFactory = Callable[..., tuple[str, TeiServer]]
MRL = {"name": "minilm", "profile": "all-minilm-l6-v2", "matryoshka_dimensions": [32, 64, 128, 384]}
PROMPTED = {
    "name": "minilm",
    "profile": "all-minilm-l6-v2",
    "prompts": {"query": "Query: ", "document": "Document: "},
    "default_prompt_name": "document",
}


def with_cache(settings: dict[str, Any], **cache: Any) -> dict[str, Any]:
    return {**settings, "cache": {"enabled": True, **cache}}


def post(url: str, texts: Any, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    r = httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": texts, **body}, headers=headers or {})
    assert r.status_code == 200, r.text
    return r


def vectors(r: httpx.Response) -> np.ndarray:
    rows = []
    for d in r.json()["data"]:
        e = d["embedding"]
        rows.append(np.frombuffer(base64.b64decode(e), "<f4") if isinstance(e, str) else e)
    return np.asarray(rows, dtype=np.float32)


def texts_sent(server: TeiServer) -> list[str]:
    """Every text client traffic made the backend embed (not the gateway's own probes)."""
    out: list[str] = []
    for r in server.received:
        if r.method == "POST" and r.body and not is_probe(r.body):
            import json

            out += json.loads(r.body)["inputs"]
    return out


def test_hit_partial_miss_only_misses_reach_the_backend(tei_factory: TeiFactory) -> None:
    url, tei = tei_factory()
    with run_gateway(with_cache(settings_for([{"name": "tei", "kind": "tei", "model": "minilm", "url": url}]))) as gw:
        first = post(gw.url, ["alpha", "beta"])
        assert first.headers["x-embedding-cache"] == "miss" and texts_sent(tei) == ["alpha", "beta"]
        mixed = post(gw.url, ["beta", "gamma", "alpha"])
        assert mixed.headers["x-embedding-cache"] == "partial" and texts_sent(tei)[2:] == ["gamma"]
        uncached = post(gw.url, ["beta", "gamma", "alpha"], {"cache-control": "no-store"})
        assert "x-embedding-cache" not in uncached.headers
        # Input order kept (llama.cpp's numbers move ~1e-5 with what else it batches; other texts differ by far more).
        assert np.allclose(vectors(mixed), vectors(uncached), atol=1e-4)
        before = len(texts_sent(tei))
        hit = post(gw.url, ["gamma", "alpha", "beta"])
        assert hit.headers["x-embedding-cache"] == "hit" and hit.headers["x-embedding-backend"] == "cache"
        assert len(texts_sent(tei)) == before  # all hits: no backend touched
        refreshed = post(gw.url, ["alpha"], {"cache-control": "no-cache"})
        assert refreshed.headers["x-embedding-cache"] == "miss" and texts_sent(tei)[-1] == "alpha"
        metrics = httpx.get(f"{gw.url}/metrics").text
        hits = re.search(r'^embedding_gateway_cache_hits_total\{model="minilm"\} (\S+)$', metrics, re.M)
        assert hits is not None and float(hits.group(1)) == 5  # beta, alpha, then three


def test_one_entry_serves_every_dimension_and_encoding(primary: LlamaCppProcess) -> None:
    with run_gateway(with_cache(settings_for([llamacpp_backend("llama", primary.url)], [MRL]))) as gw:
        assert post(gw.url, "one entry").headers["x-embedding-cache"] == "miss"
        for dims in (32, 64, 128, 384):
            for encoding in ("float", "base64"):
                cached = post(gw.url, "one entry", dimensions=dims, encoding_format=encoding)
                assert cached.headers["x-embedding-cache"] == "hit", (dims, encoding)
                fresh = post(
                    gw.url, "one entry", {"cache-control": "no-store"}, dimensions=dims, encoding_format=encoding
                )
                assert vectors(cached).shape == (1, dims)
                assert np.allclose(vectors(cached), vectors(fresh), atol=1e-6)
        tei = httpx.post(f"{gw.url}/embed", json={"inputs": "one entry", "dimensions": 64})
        assert tei.headers["x-embedding-cache"] == "hit"
        assert np.allclose(np.asarray(tei.json(), dtype=np.float32), vectors(post(gw.url, "one entry", dimensions=64)))


def test_query_and_document_prompts_never_collide(primary: LlamaCppProcess) -> None:
    with run_gateway(with_cache(settings_for([llamacpp_backend("llama", primary.url)], [PROMPTED]))) as gw:
        query = post(gw.url, "same words", prompt_name="query")
        document = post(gw.url, "same words", prompt_name="document")
        assert query.headers["x-embedding-cache"] == document.headers["x-embedding-cache"] == "miss"
        assert float(vectors(query)[0] @ vectors(document)[0]) < 0.9999
        again = post(gw.url, "same words", prompt_name="query")
        assert again.headers["x-embedding-cache"] == "hit" and np.allclose(vectors(again), vectors(query), atol=1e-6)
        default = post(gw.url, "same words")  # the default prompt is "document": the same entry
        assert default.headers["x-embedding-cache"] == "hit"


def test_another_space_never_hits_and_a_quarantined_backend_s_entries_go() -> None:
    import asyncio

    async def scenario() -> None:
        cache = EmbeddingCache(CacheSettings(), Metrics())
        prompt = Prompt("document", "Document: ")
        v = np.ones((1, 4), dtype=np.float32) / 2
        await cache.put_many([cache_key("m@aaaa", prompt, "t")], v, ["good"])
        assert (await cache.get_many([cache_key("m@bbbb", prompt, "t")])) == [None]  # another space
        assert (await cache.get_many([cache_key("m@aaaa", Prompt("query", "Query: "), "t")])) == [None]

        class St:  # what sync() reads of a backend's state
            def __init__(self, name: str) -> None:
                self.backend = type("B", (), {"name": name})()
                self.agreement = Verdict.AGREE
                self.last_pass_at: float | None = time.time()

        old_key, new_key = cache_key("m@aaaa", prompt, "old"), cache_key("m@aaaa", prompt, "new")
        bad = St("bad")
        bad.last_pass_at = time.time() - 10
        await cache.put_many([old_key], v, ["bad"])
        cache._made_by["bad"][0] = (time.time() - 20, old_key)  # made before its last passing check
        await cache.put_many([new_key], v, ["bad"])  # made after it
        bad.agreement = Verdict.DISAGREE
        cache.sync([bad])  # type: ignore[list-item]
        old, new = await cache.get_many([old_key, new_key])
        assert old is not None and new is None

    asyncio.run(scenario())


def test_a_shadow_s_vectors_never_enter(primary: LlamaCppProcess, fallback: LlamaCppProcess) -> None:
    backends = [
        llamacpp_backend("live", primary.url),
        llamacpp_backend("shade", fallback.url, shadow=True, shadow_sample=1.0),
    ]
    with run_gateway(with_cache(settings_for(backends))) as gw:
        post(gw.url, ["shadowed text"])
        wait_until(lambda: gw.runtime.shadows.stats["shade"].samples >= 1, timeout=10)
        made = gw.runtime.cache._made_by
        assert "live" in made and "shade" not in made


def test_two_gateways_share_hits_through_redis_and_survive_its_death(
    tei_factory: TeiFactory, redis_server: RedisServer
) -> None:
    url, tei = tei_factory()
    settings = with_cache(
        settings_for([{"name": "tei", "kind": "tei", "model": "minilm", "url": url}]), url=redis_server.url
    )
    with cli_gateway(settings) as a, cli_gateway(settings) as b:
        assert post(a.url, ["shared"]).headers["x-embedding-cache"] == "miss"
        before = len(texts_sent(tei))
        assert post(b.url, ["shared"]).headers["x-embedding-cache"] == "hit"  # from A, through Redis
        assert len(texts_sent(tei)) == before
        redis_server.kill()
        for i in range(5):
            assert post(b.url, [f"after redis {i}", "shared"]).status_code == 200  # local tier: never an error
        wait_until(lambda: any("shared tier unreachable" in line for line in b.lines), timeout=5)
        assert len([line for line in b.lines if "shared tier unreachable" in line]) == 1
        errors = re.search(
            r"^embedding_gateway_cache_storage_errors_total (\S+)$", httpx.get(f"{b.url}/metrics").text, re.M
        )
        assert errors is not None and float(errors.group(1)) >= 1


def test_a_backend_found_to_disagree_loses_what_it_cached_since_its_last_pass(
    primary: LlamaCppProcess,
    llama_factory: Callable[..., LlamaCppProcess],
    variants: dict[str, Any],
    tei_factory: TeiFactory,
) -> None:
    odd = llama_factory("cache-perturbed", gguf=variants["perturbed"])
    url, tei = tei_factory()  # a TEI in front of the real llama.cpp: it can be swapped underneath
    backends = [
        {"name": "tei", "kind": "tei", "model": "minilm", "url": url, "priority": 0},
        llamacpp_backend("ref", primary.url, priority=1),
    ]
    models = [{"name": "minilm", "profile": "all-minilm-l6-v2", "reference": "ref"}]
    settings = with_cache(settings_for(backends, models))
    settings["consistency"] = {"interval_s": 3600}  # the next check is the one this test asks for
    with run_gateway(settings) as gw:
        first = post(gw.url, ["served by tei"])
        assert first.headers["x-embedding-backend"] == "tei" and first.headers["x-embedding-cache"] == "miss"
        assert post(gw.url, ["served by tei"]).headers["x-embedding-cache"] == "hit"
        tei.upstream, tei._client = odd.url, None  # the same URL now answers with other weights

        def swapped() -> bool:
            direct = np.asarray(httpx.post(f"{url}/embed", json={"inputs": "served by tei"}).json(), dtype=np.float32)
            return float(direct[0] @ vectors(first)[0]) < 0.99

        wait_until(swapped, timeout=10)
        httpx.post(f"{gw.url}/v1/consistency", timeout=60)
        assert httpx.get(f"{gw.url}/v1/backends").json()["data"][0]["agreement"] == "disagree"
        after = post(gw.url, ["served by tei"])
        assert after.headers["x-embedding-cache"] == "miss" and after.headers["x-embedding-backend"] == "ref"
        assert float(vectors(after)[0] @ vectors(first)[0]) > 0.9999  # tei agreed then: the same vector
