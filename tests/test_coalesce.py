"""Coalescing: concurrent single-text requests share backend calls, and nothing else about them changes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

from backends.managed.process import LlamaCppProcess
from tests.helpers import RunningGateway, cosines, direct_embeddings, run_gateway, settings_for, wait_until
from tests.servers.base import Fault, is_probe
from tests.servers.tei import TeiServer

TeiFactory = Callable[..., tuple[str, TeiServer]]


def tei(url: str, **kw: Any) -> dict[str, Any]:
    return {"name": "tei", "kind": "tei", "model": "minilm", "url": url, **kw}


def model(**kw: Any) -> list[dict[str, Any]]:
    return [{"name": "minilm", "profile": "all-minilm-l6-v2", "audit_sample": 0, "coalesce_ms": 2, **kw}]


def backend_view(gw: RunningGateway) -> dict[str, Any]:
    return httpx.get(f"{gw.url}/v1/backends").json()["data"][0]  # type: ignore[no-any-return]


def embed_calls(server: TeiServer, since: int) -> list[list[str]]:
    """The inputs of each /embed call for clients since `since` received requests (not the checks' probes)."""
    calls = []
    for r in server.received[since:]:
        if r.path == "/embed" and not is_probe(r.body):
            inputs = json.loads(r.body)["inputs"]
            calls.append([inputs] if isinstance(inputs, str) else inputs)
    return calls


async def burst(url: str, texts: list[str], timeout: float = 60) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=len(texts))) as c:
        return await asyncio.gather(
            *(c.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": t}) for t in texts)
        )


def test_fifty_concurrent_requests_share_calls_and_each_gets_its_own_vector(
    tei_factory: TeiFactory, primary: LlamaCppProcess
) -> None:
    url, server = tei_factory(seconds_per_call=0.02)  # a per-call cost, as real servers have
    with run_gateway(settings_for([tei(url)], model())) as gw:
        wait_until(lambda: backend_view(gw)["coalescing"] == "on", timeout=30)
        texts = [f"request number {i} about the weather in city {i * 7}" for i in range(50)]
        before = len(server.received)
        responses = asyncio.run(burst(gw.url, texts))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        got = np.asarray([r.json()["data"][0]["embedding"] for r in responses], dtype=np.float32)
        assert cosines(got, direct_embeddings(primary.url, texts)).min() >= 0.9999  # each its own text, in order
        calls = embed_calls(server, before)
        assert sorted(t for call in calls for t in call) == sorted(texts)  # every text sent once
        assert len(calls) < len(texts) / 2, f"{len(calls)} backend calls for {len(texts)} requests"
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert 'embedding_gateway_coalesced_requests_total{backend="tei"}' in metrics
        assert "embedding_gateway_batch_texts_count" in metrics
        assert backend_view(gw)["coalescing_reason"].startswith("batch-invariant")


def test_a_client_that_leaves_takes_its_texts_out_of_the_call_not_yet_sent(tei_factory: TeiFactory) -> None:
    url, server = tei_factory()
    with run_gateway(settings_for([tei(url)], model(coalesce_ms=400))) as gw:
        wait_until(lambda: backend_view(gw)["coalescing"] == "on", timeout=30)
        server.inject(Fault("latency", seconds=1.0, times=2))  # two calls in flight (the slots): the next ones wait

        async def scenario() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as c:
                body: Callable[[str], dict[str, Any]] = lambda t: {"model": "minilm", "input": t}  # noqa: E731
                first = asyncio.ensure_future(c.post(f"{gw.url}/v1/embeddings", json=body("first one in")))
                second = asyncio.ensure_future(c.post(f"{gw.url}/v1/embeddings", json=body("second one in")))
                await asyncio.sleep(0.2)
                async with httpx.AsyncClient(timeout=30) as leaver:
                    gone = asyncio.ensure_future(leaver.post(f"{gw.url}/v1/embeddings", json=body("the one who left")))
                    stays = asyncio.ensure_future(c.post(f"{gw.url}/v1/embeddings", json=body("the one who stayed")))
                    await asyncio.sleep(0.1)
                    gone.cancel()  # the client disconnects inside the window
                await second
                return await first, await stays

        before = len(server.received)
        first, stays = asyncio.run(scenario())
        assert first.status_code == 200 and stays.status_code == 200
        sent = [t for call in embed_calls(server, before) for t in call]
        assert "the one who stayed" in sent and "the one who left" not in sent


def test_one_bad_request_merged_with_good_ones_fails_alone(tei_factory: TeiFactory) -> None:
    url, _ = tei_factory(reject_text="forbidden", seconds_per_call=0.05)
    with run_gateway(settings_for([tei(url)], model(coalesce_ms=50))) as gw:
        wait_until(lambda: backend_view(gw)["coalescing"] == "on", timeout=30)
        texts = (
            [f"a good text {i}" for i in range(8)] + ["a forbidden text"] + [f"more good text {i}" for i in range(8)]
        )
        responses = asyncio.run(burst(gw.url, texts))
        statuses = {t: r.status_code for t, r in zip(texts, responses, strict=True)}
        assert statuses.pop("a forbidden text") == 400
        assert set(statuses.values()) == {200}, statuses


def test_a_backend_whose_vectors_change_with_the_batch_is_never_coalesced(tei_factory: TeiFactory) -> None:
    url, server = tei_factory(batch_mixing=0.2, seconds_per_call=0.02)
    with run_gateway(settings_for([tei(url)], model())) as gw:
        wait_until(
            lambda: backend_view(gw)["coalescing_reason"] != "not measured yet (the agreement check measures it)"
        )
        view = backend_view(gw)
        assert view["coalescing"] == "off" and "change with batch composition" in view["coalescing_reason"]
        before = len(server.received)
        texts = [f"single text {i}" for i in range(20)]
        assert all(r.status_code == 200 for r in asyncio.run(burst(gw.url, texts)))
        assert len(embed_calls(server, before)) == len(texts)  # one call per request, as sent


def test_coalesce_ms_zero_turns_it_off(tei_factory: TeiFactory) -> None:
    url, _ = tei_factory()
    with run_gateway(settings_for([tei(url)], model(coalesce_ms=0))) as gw:
        time.sleep(0.5)
        assert backend_view(gw)["coalescing"] == "off"
        assert backend_view(gw)["coalescing_reason"] == "coalesce_ms = 0 for its model"


def test_requests_queued_behind_busy_slots_go_in_one_call(tei_factory: TeiFactory, primary: LlamaCppProcess) -> None:
    # Two slots (the backend says so), both busy with slow calls; ten requests arrive 30 ms apart, too far
    # apart for a 2 ms window: the queue gathers them - they leave it together, in one call, when a slot frees.
    url, server = tei_factory(max_concurrent_requests=2)
    with run_gateway(settings_for([tei(url)], model())) as gw:
        wait_until(lambda: backend_view(gw)["coalescing"] == "on", timeout=30)
        server.inject(Fault("latency", seconds=1.0, times=2))

        async def scenario() -> tuple[list[httpx.Response], list[httpx.Response]]:
            async with httpx.AsyncClient(timeout=30) as c:
                body: Callable[[str], dict[str, Any]] = lambda t: {"model": "minilm", "input": t}  # noqa: E731
                slow = [
                    asyncio.ensure_future(c.post(f"{gw.url}/v1/embeddings", json=body(f"slow {i}"))) for i in (1, 2)
                ]
                await asyncio.sleep(0.2)
                queued = []
                for t in texts:
                    queued.append(asyncio.ensure_future(c.post(f"{gw.url}/v1/embeddings", json=body(t))))
                    await asyncio.sleep(0.03)
                return list(await asyncio.gather(*slow)), list(await asyncio.gather(*queued))

        texts = [f"queued request {i} on the topic of rivers" for i in range(10)]
        before = len(server.received)
        slow, queued = asyncio.run(scenario())
        assert all(r.status_code == 200 for r in slow + queued), [r.text for r in slow + queued]
        got = np.asarray([r.json()["data"][0]["embedding"] for r in queued], dtype=np.float32)
        assert cosines(got, direct_embeddings(primary.url, texts)).min() >= 0.9999
        calls = [call for call in embed_calls(server, before) if not call[0].startswith("slow")]
        assert len(calls) <= 2, calls  # one group (two if the first arrivals beat the rest to a slot)
