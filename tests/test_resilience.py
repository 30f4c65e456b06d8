"""Resilience end to end: real llama.cpp servers, the TEI test server, killing, hanging, throttling."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from backends.managed.process import LlamaCppProcess, free_port
from tests.helpers import (
    MINILM,
    TEXTS,
    answers_200,
    cosines,
    direct_embeddings,
    embed,
    hanging_server,
    llamacpp_backend,
    run_gateway,
    settings_for,
    vectors_of,
    wait_until,
)
from tests.servers.base import Fault, traffic
from tests.servers.tei import TeiServer

TeiFactory = Callable[..., tuple[str, TeiServer]]


def backend_entry(url: str, name: str) -> dict[str, object]:
    entries = {b["name"]: b for b in httpx.get(f"{url}/v1/backends").json()["data"]}
    return entries[name]  # type: ignore[no-any-return]


def test_kill_primary_during_a_burst_then_it_comes_back(llama_factory: Callable[..., LlamaCppProcess]) -> None:
    primary, spare = llama_factory("chaos-primary"), llama_factory("chaos-spare")
    backends = [llamacpp_backend("primary", primary.url, priority=0), llamacpp_backend("spare", spare.url, priority=1)]
    resilience = {"breaker_cooldown_s": 1.0, "healthy_threshold": 1}
    with run_gateway(settings_for(backends, resilience=resilience)) as gw:
        stop = threading.Event()
        results: list[tuple[int, str]] = []

        def client() -> None:
            with httpx.Client(base_url=gw.url, timeout=30) as c:
                i = 0
                while not stop.is_set():
                    r = c.post("/v1/embeddings", json={"model": "minilm", "input": [f"burst {i}", "second text"]})
                    results.append((r.status_code, r.headers.get("x-embedding-backend", "")))
                    i += 1

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client) for _ in range(6)]
            time.sleep(1.0)
            primary.kill()  # kill -9 in the middle of the burst
            time.sleep(2.5)
            stop.set()
            for f in futures:
                f.result()
        assert results and all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:5]
        assert {"primary", "spare"} <= {b for _, b in results}
        entry = backend_entry(gw.url, "primary")
        assert entry["circuit_trips"] >= 1 and entry["circuit"] in ("open", "half_open")
        assert entry["healthy"] is False

        primary.start()  # same port, as a restarted container would be
        primary.wait_ready()
        wait_until(lambda: backend_entry(gw.url, "primary")["healthy"] is True)
        wait_until(lambda: backend_entry(gw.url, "primary")["circuit"] == "closed")
        wait_until(lambda: embed(gw, "minilm", "welcome back").headers["x-embedding-backend"] == "primary")
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert 'embedding_gateway_circuit_trips_total{backend="primary"}' in metrics
        assert 'embedding_gateway_fallbacks_total{model="minilm"}' in metrics


def test_429_with_retry_after_shifts_traffic_and_holds_off(tei_factory: TeiFactory, fallback: LlamaCppProcess) -> None:
    url, server = tei_factory()
    tei = {"name": "tei", "kind": "tei", "model": "minilm", "url": url, "priority": 0}
    backends = [tei, llamacpp_backend("llama", fallback.url, priority=1)]
    with run_gateway(settings_for(backends)) as gw:
        before = len(traffic(server))
        overloaded = b'{"error":"Model is overloaded","error_type":"Overloaded"}'
        server.inject(Fault("status", 429, overloaded, {"Retry-After": "30"}, times=-1))
        started = time.monotonic()
        for i in range(10):
            r = embed(gw, "minilm", f"request {i}")
            assert r.status_code == 200 and r.headers["x-embedding-backend"] == "llama"
        assert time.monotonic() - started < 5
        # One request met the 429; Retry-After then kept every later one (and the probes) away.
        assert len(traffic(server)) - before == 1
        assert backend_entry(gw.url, "tei")["circuit"] == "open"


def test_hanging_backend_defaults_answer_from_the_next_in_under_10s(primary: LlamaCppProcess) -> None:
    """Default settings, no tuning: the first backend hangs, the second answers."""
    with hanging_server() as hung:
        backends = [llamacpp_backend("hung", hung, priority=0), llamacpp_backend("live", primary.url, priority=1)]
        settings = {"models": [MINILM], "backends": backends}  # defaults throughout
        started = time.monotonic()
        with run_gateway(settings, wait_ready=False) as gw:
            assert time.monotonic() - started < 5  # start-up did not wait on the hanging backend
            assert httpx.get(f"{gw.url}/health").status_code == 200
            t0 = time.monotonic()
            r = embed(gw, "minilm", TEXTS)
            took = time.monotonic() - t0
            assert r.status_code == 200 and r.headers["x-embedding-backend"] == "live"
            assert took < 10, took
            assert cosines(vectors_of(r), direct_embeddings(primary.url, TEXTS)).min() >= 0.99999
            wait_until(lambda: backend_entry(gw.url, "hung")["healthy"] is False, timeout=20)
            t0 = time.monotonic()
            assert embed(gw, "minilm", "next one").headers["x-embedding-backend"] == "live"
            assert time.monotonic() - t0 < 1  # known unhealthy: skipped without waiting for a timeout


def test_nothing_left_gives_a_clean_504_or_503_never_a_hang() -> None:
    with hanging_server() as hung:
        backends = [llamacpp_backend("hung", hung, timeout_s=30)]
        with run_gateway(settings_for(backends), wait_ready=False) as gw:
            t0 = time.monotonic()
            r = httpx.post(
                f"{gw.url}/v1/embeddings",
                json={"model": "minilm", "input": "x"},
                headers={"x-request-timeout": "1.5"},
                timeout=30,
            )
            # 504 when the deadline passes first; 503 when the health check called it down first.
            assert (r.status_code, r.json()["error"]["code"]) in (
                (504, "deadline_exceeded"),
                (503, "no_backend_available"),
            )
            assert time.monotonic() - t0 < 4
            t0 = time.monotonic()
            tei = httpx.post(f"{gw.url}/embed", json={"inputs": "x"}, headers={"x-request-timeout": "1"}, timeout=30)
            # By now the health check has called it down: no backend left, a clean 503 at once (or 504).
            assert tei.status_code in (503, 504) and set(tei.json()) == {"error", "error_type"}
            assert time.monotonic() - t0 < 2
            bad = httpx.post(
                f"{gw.url}/v1/embeddings", json={"model": "minilm", "input": "x"}, headers={"x-request-timeout": "soon"}
            )
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-request-timeout"
    dead = [llamacpp_backend("dead", f"http://127.0.0.1:{free_port()}")]
    with run_gateway(settings_for(dead), wait_ready=False) as gw:
        t0 = time.monotonic()
        r = embed(gw, "minilm", "x")
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and time.monotonic() - t0 < 3


def test_a_backend_of_another_space_is_never_a_fallback(
    llama_factory: Callable[..., LlamaCppProcess], primary: LlamaCppProcess
) -> None:
    doomed = llama_factory("doomed-a")
    models = [MINILM, {"name": "other-space", "profile": "all-minilm-l6-v2", "prompts": {"q": "q: "}}]
    backends = [
        llamacpp_backend("a", doomed.url, model="minilm"),
        llamacpp_backend("b", primary.url, model="other-space"),
    ]
    with run_gateway(settings_for(backends, models)) as gw:
        doomed.kill()
        for _ in range(5):
            r = embed(gw, "minilm", "x")
            assert r.status_code == 503  # not served by "b", healthy as it is
        assert backend_entry(gw.url, "b")["requests"] == 0
        assert embed(gw, "other-space", "x").headers["x-embedding-backend"] == "b"


def test_sigterm_lets_in_flight_requests_finish(tei_factory: TeiFactory, tmp_path: Path) -> None:
    url, server = tei_factory()
    port = free_port()
    config = tmp_path / "gw.toml"
    config.write_text(f"""
[server]
port = {port}
shutdown_grace_s = 10
[[models]]
name = "minilm"
profile = "all-minilm-l6-v2"
[[backends]]
name = "slow-tei"
kind = "tei"
model = "minilm"
url = "{url}"
""")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).parents[1],
    )
    try:
        wait_until(lambda: answers_200(f"http://127.0.0.1:{port}/ready"))
        server.inject(Fault("latency", seconds=2.0))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                lambda: httpx.post(
                    f"http://127.0.0.1:{port}/v1/embeddings", json={"model": "minilm", "input": "in flight"}, timeout=30
                )
            )
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            r = pending.result()
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
        proc.wait(timeout=20)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


def test_a_busy_backend_is_not_declared_dead_by_its_own_queue(tei_factory: TeiFactory) -> None:
    """Health probes queue behind real traffic; a probe timing out while real requests succeed must not
    mark the backend unhealthy or trip its circuit (that turned a loaded spare into a 503 storm)."""
    url, server = tei_factory()
    server.inject(Fault("latency", seconds=0.5, times=-1))  # every call is slow, but answers
    backends = [{"name": "busy", "kind": "tei", "model": "minilm", "url": url}]
    resilience = {"health_interval_s": 0.2, "health_timeout_s": 0.3}
    with run_gateway(settings_for(backends, resilience=resilience), wait_ready=False) as gw:
        # The gateway is up (its backend list answers); the backend itself may still be unknown.
        assert backend_entry(gw.url, "busy")["name"] == "busy"
        stop = time.monotonic() + 4
        statuses: list[int] = []

        def client() -> None:
            with httpx.Client(base_url=gw.url, timeout=30) as c:
                while time.monotonic() < stop:
                    statuses.append(c.post("/v1/embeddings", json={"model": "minilm", "input": "x"}).status_code)

        samples = []
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client) for _ in range(4)]
            time.sleep(1.5)  # traffic is flowing
            while time.monotonic() < stop:
                samples.append(backend_entry(gw.url, "busy")["healthy"])
                time.sleep(0.1)
            for f in futures:
                f.result()
        entry = backend_entry(gw.url, "busy")
    assert statuses and set(statuses) == {200}, statuses
    assert samples and all(samples), samples  # never declared unhealthy while serving
    assert entry["circuit"] == "closed" and entry["circuit_trips"] == 0


def test_passing_health_checks_cut_a_long_cooldown_short(llama_factory: Callable[..., LlamaCppProcess]) -> None:
    server, spare = llama_factory("cooldown"), llama_factory("cooldown-spare")
    backends = [llamacpp_backend("main", server.url), llamacpp_backend("spare", spare.url, priority=1)]
    resilience = {"breaker_cooldown_s": 60.0, "breaker_consecutive_failures": 1}
    with run_gateway(settings_for(backends, resilience=resilience)) as gw:
        server.kill()
        assert embed(gw, "minilm", "x").headers["x-embedding-backend"] == "spare"
        wait_until(lambda: backend_entry(gw.url, "main")["circuit"] == "open")
        server.start()
        server.wait_ready()
        wait_until(lambda: backend_entry(gw.url, "main")["circuit"] == "closed", timeout=15)  # not after 60 s
        wait_until(lambda: embed(gw, "minilm", "y").headers["x-embedding-backend"] == "main")
