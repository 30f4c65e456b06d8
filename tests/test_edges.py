"""Failover at the edges (issue 8), on real llama.cpp servers and the TEI test server: hostile deadlines,
the first seconds after /ready, big batches beside small ones, slow primaries, clients that leave."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import statistics
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from backends.managed.process import LlamaCppProcess, free_port
from tests.helpers import (
    MINILM,
    RunningGateway,
    answers_200,
    embed,
    llamacpp_backend,
    run_gateway,
    settings_for,
    wait_until,
)
from tests.servers.base import Fault
from tests.servers.tei import TeiServer

Factory = Callable[..., LlamaCppProcess]
TeiFactory = Callable[..., tuple[str, TeiServer]]


def metric_sum(gw: RunningGateway, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{gw.url}/metrics").text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def circuits(gw: RunningGateway) -> dict[str, tuple[str, int]]:
    return {b["name"]: (b["circuit"], b["circuit_trips"]) for b in httpx.get(f"{gw.url}/v1/backends").json()["data"]}


# -- 1. a client's deadline is not a backend failure ---------------------------------------------------
def test_tiny_and_tight_deadlines_never_trip_a_circuit(primary: LlamaCppProcess, fallback: LlamaCppProcess) -> None:
    backends = [llamacpp_backend("a", primary.url, priority=0), llamacpp_backend("b", fallback.url, priority=1)]
    with run_gateway(settings_for(backends)) as gw:

        def tiny(i: int) -> int:
            r = httpx.post(
                f"{gw.url}/v1/embeddings",
                json={"model": "minilm", "input": [f"tiny {i}"] * 8},
                headers={"x-request-timeout": "0.000001"},
                timeout=30,
            )
            return r.status_code

        def tight(i: int) -> int:  # honest clients with a 0.25 s budget, on a loaded 2-core machine
            r = httpx.post(
                f"{gw.url}/v1/embeddings",
                json={"model": "minilm", "input": [f"tight {i} {j}" for j in range(64)]},
                headers={"x-request-timeout": "0.25"},
                timeout=30,
            )
            return r.status_code

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            tiny_codes = list(pool.map(tiny, range(60)))
            tight_codes = list(pool.map(tight, range(64)))
        assert set(tiny_codes) == {504}, tiny_codes
        # Served, cut by the deadline, or refused at once because the queue could not make it (issue 18).
        assert set(tight_codes) <= {200, 503, 504}, tight_codes
        r = embed(gw, "minilm", "a normal request")
        assert r.status_code == 200, r.text
        assert circuits(gw) == {"a": ("closed", 0), "b": ("closed", 0)}
        assert metric_sum(gw, "embedding_gateway_circuit_trips_total") == 0
        assert httpx.get(f"{gw.url}/ready").status_code == 200
        body = r = httpx.post(
            f"{gw.url}/v1/embeddings",
            json={"model": "minilm", "input": "x"},
            headers={"x-request-timeout": "0.000001"},
        )
        assert body.status_code == 504 and body.json()["error"]["code"] == "deadline_exceeded"


# -- 2. failover in the first seconds after /ready -----------------------------------------------------
def _ready_only(gw_url: str) -> None:
    """What a load balancer does: wait for /ready and nothing else."""
    wait_until(lambda: answers_200(f"{gw_url}/ready"), timeout=60)


@pytest.mark.parametrize("delay", [0, 0.3, 0.8, 1.5, 2.2, 3.0])
def test_primary_killed_right_after_ready_fails_over(
    llama_factory: Factory, fallback: LlamaCppProcess, delay: float
) -> None:
    primary = llama_factory(f"early-{delay}")
    backends = [
        llamacpp_backend("primary", primary.url, priority=0),
        llamacpp_backend("spare", fallback.url, priority=1),
    ]
    with run_gateway(settings_for(backends), wait_ready=False) as gw:
        _ready_only(gw.url)
        time.sleep(delay)
        primary.kill()
        r = embed(gw, "minilm", ["after the primary died", "second"])
        assert r.status_code == 200, r.text
        assert r.headers["x-embedding-backend"] == "spare"


@pytest.mark.parametrize("delay", [0, 0.3, 0.8, 1.5, 2.2, 3.0])
def test_tei_reference_failing_right_after_ready_fails_over(
    tei_factory: TeiFactory, fallback: LlamaCppProcess, delay: float
) -> None:
    url, tei = tei_factory()
    backends = [
        {"name": "tei", "kind": "tei", "model": "minilm", "url": url, "priority": 0},
        llamacpp_backend("spare", fallback.url, priority=1),
    ]
    models = [{**MINILM, "reference": "tei"}]
    with run_gateway(settings_for(backends, models=models), wait_ready=False) as gw:
        _ready_only(gw.url)
        time.sleep(delay)
        tei.inject(Fault("status", 503, b'{"error":"unhealthy","error_type":"Unhealthy"}', times=-1))
        r = embed(gw, "minilm", ["the reference answers 503 now"])
        assert r.status_code == 200, r.text
        assert r.headers["x-embedding-backend"] == "spare"


def test_a_fallback_that_appears_while_the_reference_is_down_is_verified_and_serves(
    llama_factory: Factory, minilm_gguf: object
) -> None:
    """Rescue: the spare comes up after the first check, the reference is dead: it is verified on demand
    against the reference's recorded probe vectors, and serves the request that found nobody else."""
    primary = llama_factory("rescue-primary")
    spare = LlamaCppProcess(gguf=primary.gguf, port=free_port(), parallel=2, threads=1)
    backends = [llamacpp_backend("primary", primary.url, priority=0), llamacpp_backend("spare", spare.url, priority=1)]
    settings = settings_for(backends)
    settings["consistency"] = {"interval_s": 3600}
    with run_gateway(settings, wait_ready=False) as gw:
        _ready_only(gw.url)
        # Down from the start, the spare is failed, not pending: ready does not wait for it (issue 18).
        assert "pending_verification" not in httpx.get(f"{gw.url}/ready").json()
        spare_view = httpx.get(f"{gw.url}/v1/backends").json()["data"][1]
        assert spare_view["agreement"] == "pending" and spare_view["healthy"] is False
        primary.kill()
        spare.start()
        try:
            spare.wait_ready()
            backends_of = lambda: {b["name"]: b for b in httpx.get(f"{gw.url}/v1/backends").json()["data"]}  # noqa: E731
            wait_until(lambda: backends_of()["spare"]["healthy"] is True, timeout=10)
            r = embed(gw, "minilm", ["the spare is my only hope"])
            assert r.status_code == 200, r.text
            assert r.headers["x-embedding-backend"] == "spare"
            assert backends_of()["spare"]["agreement"] in ("agree", "drift", "reference")
            report = httpx.get(f"{gw.url}/v1/consistency").json()["data"][0]
            assert any(f["kind"] == "recorded_reference" for f in report["findings"]), report
        finally:
            spare.stop()


# -- 3. slow is not dead ------------------------------------------------------------------------------
def test_a_2048_text_request_beside_small_ones_on_one_llamacpp(llama_factory: Factory) -> None:
    solo = llama_factory("solo")
    # A generous deadline: this is about trips and the small requests, not how fast one CPU embeds 2048 texts.
    resilience = {"request_timeout_s": 120.0}
    with run_gateway(settings_for([llamacpp_backend("solo", solo.url)], resilience=resilience)) as gw:
        assert httpx.get(f"{gw.url}/v1/backends").json()["data"][0]["concurrency_limit"] == 4  # 2 per slot
        stop = threading.Event()
        small: list[tuple[int, float]] = []

        def client(i: int) -> None:
            with httpx.Client(base_url=gw.url, timeout=60) as c:
                n = 0
                while not stop.is_set():
                    t = time.perf_counter()
                    r = c.post("/v1/embeddings", json={"model": "minilm", "input": f"small {i} {n}"})
                    small.append((r.status_code, time.perf_counter() - t))
                    n += 1

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client, i) for i in range(8)]
            time.sleep(0.5)
            texts = [f"bulk text number {i} about something" for i in range(2048)]
            t = time.perf_counter()
            big = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "minilm", "input": texts}, timeout=120)
            big_s = time.perf_counter() - t
            stop.set()
            for f in futures:
                f.result()
        assert big.status_code == 200, big.text
        assert len(big.json()["data"]) == 2048
        codes = [c for c, _ in small]
        assert codes and set(codes) == {200}, [c for c in codes if c != 200][:5]
        assert circuits(gw) == {"solo": ("closed", 0)}
        p99 = statistics.quantiles([s for _, s in small], n=100)[98] if len(small) > 2 else 0.0
        print(f"\n2048 texts: {big_s:.2f}s; {len(small)} small requests beside it, p99 {p99 * 1000:.0f} ms")


def test_a_slowed_primary_overflows_to_the_secondary(tei_factory: TeiFactory, fallback: LlamaCppProcess) -> None:
    url, tei = tei_factory(max_concurrent_requests=2)
    backends = [
        {"name": "slow", "kind": "tei", "model": "minilm", "url": url, "priority": 0},
        llamacpp_backend("spare", fallback.url, priority=1),
    ]
    with run_gateway(settings_for(backends, models=[{**MINILM, "reference": "slow"}])) as gw:
        tei.inject(Fault("latency", seconds=0.3, times=-1))
        served: list[str] = []

        def client(i: int) -> None:
            with httpx.Client(base_url=gw.url, timeout=30) as c:
                for n in range(6):
                    r = c.post("/v1/embeddings", json={"model": "minilm", "input": f"overflow {i} {n}"})
                    assert r.status_code == 200, r.text
                    served.append(r.headers["x-embedding-backend"])

        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(client, range(8)))
        elapsed = time.perf_counter() - t
        # 48 requests; the primary alone (2 at a time, >= 0.3 s each) would need >= 7 s.
        assert served.count("spare") >= 12, served
        assert metric_sum(gw, "embedding_gateway_overflow_total", backend="spare") >= 12
        assert elapsed < 7.0
        tei.clear()


# -- 4. a client that goes away stops costing anything --------------------------------------------------
async def _disconnecting_client(url: str, texts: list[str], after_s: float) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(after_s):
                await c.post("/v1/embeddings", json={"model": "minilm", "input": texts})


def test_clients_that_disconnect_stop_their_backend_work(primary: LlamaCppProcess, fallback: LlamaCppProcess) -> None:
    backends = [llamacpp_backend("a", primary.url, priority=0), llamacpp_backend("b", fallback.url, priority=1)]
    with run_gateway(settings_for(backends, max_inflight_texts=100_000)) as gw:
        baseline = []
        for i in range(5):
            t = time.perf_counter()
            assert embed(gw, "minilm", f"warm {i}").status_code == 200
            baseline.append(time.perf_counter() - t)
        texts = [f"a long bulk job, text {i}" for i in range(2048)]

        async def burst() -> None:
            await asyncio.gather(*(_disconnecting_client(gw.url, texts, 0.5) for _ in range(10)))

        asyncio.run(burst())
        t = time.perf_counter()
        r = embed(gw, "minilm", "right after the burst")
        small_s = time.perf_counter() - t
        assert r.status_code == 200, r.text
        # Calls already at a backend when their client left finish there (llama.cpp cannot cancel
        # them); nothing new starts: once those are done, the call count stands still.
        idle = lambda: all(b["in_flight"] == 0 for b in httpx.get(f"{gw.url}/v1/backends").json()["data"])  # noqa: E731
        wait_until(idle, timeout=20)
        calls = metric_sum(gw, "embedding_gateway_backend_calls_total")
        time.sleep(1.0)
        later = metric_sum(gw, "embedding_gateway_backend_calls_total")
        assert later == calls, f"{later - calls} backend calls after every client left"
        # At most the calls already at the backends (two 32-text calls per slot) are ahead of it.
        assert small_s < max(3.0, 10 * statistics.median(baseline)), small_s
        assert metric_sum(gw, "embedding_gateway_circuit_trips_total") == 0
        assert gw.runtime.budget.texts == 0 and gw.runtime.budget.bytes == 0


def test_work_beyond_the_budget_gets_503_with_retry_after_and_small_requests_still_pass(
    primary: LlamaCppProcess,
) -> None:
    with run_gateway(settings_for([llamacpp_backend("a", primary.url)], max_inflight_texts=1000)) as gw:
        big = [f"text {i}" for i in range(800)]
        results: list[httpx.Response] = []

        def send(texts: list[str]) -> None:
            results.append(httpx.post(f"{gw.url}/v1/embeddings", json={"model": "minilm", "input": texts}, timeout=60))

        threads = [threading.Thread(target=send, args=(big,)) for _ in range(4)]
        for th in threads:
            th.start()
        time.sleep(0.05)
        small = embed(gw, "minilm", "small requests are never refused by the budget")
        for th in threads:
            th.join()
        assert small.status_code == 200
        codes = sorted(r.status_code for r in results)
        assert 200 in codes and 503 in codes, codes
        refused = next(r for r in results if r.status_code == 503)
        assert refused.headers["retry-after"] == "1"
        assert re.search(r"max_inflight_texts", refused.json()["error"]["message"])
        assert refused.json()["error"]["code"] == "overloaded"
        assert gw.runtime.budget.texts == 0


@pytest.mark.filterwarnings("error::RuntimeWarning", "error::pytest.PytestUnraisableExceptionWarning")
async def test_until_disconnect_cancels_the_work_through_the_servers_hook_or_a_watcher() -> None:
    from gateway.api.direct import until_disconnect
    from gateway.errors import ClientDisconnected
    from gateway.server import DISCONNECT_HOOK

    async def disconnects() -> dict[str, str]:  # any ASGI server: a watcher task awaits receive()
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    started = time.monotonic()
    with pytest.raises(ClientDisconnected):
        await until_disconnect({}, disconnects, asyncio.sleep(5))  # type: ignore[arg-type]
    assert time.monotonic() - started < 2

    class Hook:  # what GuardedHttpProtocol offers: callbacks on connection loss
        def __init__(self, lost: bool = False) -> None:
            self.callbacks: list[Callable[[], None]] = []
            self.lost = lost

        def watch(self, callback: Callable[[], None]) -> bool:
            if self.lost:
                return False
            self.callbacks.append(callback)
            return True

        def unwatch(self, callback: Callable[[], None]) -> None:
            self.callbacks.remove(callback)

    async def never() -> dict[str, str]:
        await asyncio.Future()
        return {}

    hook = Hook()
    asyncio.get_running_loop().call_later(0.05, lambda: [cb() for cb in list(hook.callbacks)])
    started = time.monotonic()
    with pytest.raises(ClientDisconnected):
        await until_disconnect({DISCONNECT_HOOK: hook}, never, asyncio.sleep(5))  # type: ignore[arg-type,dict-item]
    assert time.monotonic() - started < 2 and hook.callbacks == []  # cancelled, and no longer watched
    assert await until_disconnect({DISCONNECT_HOOK: hook}, never, asyncio.sleep(0, "done")) == "done"  # type: ignore[arg-type,dict-item]
    assert hook.callbacks == []
    with pytest.raises(ClientDisconnected):  # gone before the work started: it never starts
        await until_disconnect({DISCONNECT_HOOK: Hook(lost=True)}, never, asyncio.sleep(5))  # type: ignore[arg-type,dict-item]
