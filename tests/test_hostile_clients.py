"""Clients that misbehave (issue 8, items 5, 6, 9): bad bytes, silent and slow sockets under a low fd
limit, requests cut off by shutdown, HEAD probes, blank inputs. The gateway runs as its real CLI."""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from backends.managed.process import LlamaCppProcess
from tests.helpers import (
    CliGateway,
    RunningGateway,
    cli_gateway,
    hanging_server,
    llamacpp_backend,
    run_gateway,
    settings_for,
    wait_until,
)


@pytest.fixture(scope="module")
def cli(primary: LlamaCppProcess) -> Iterator[CliGateway]:
    settings = settings_for([llamacpp_backend("a", primary.url)], header_timeout_s=1.0, log_level="info")
    with cli_gateway(settings, limit_fds=256) as gw:
        yield gw


# -- 5. bad bytes are a 400, logged once, briefly ------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/embeddings", b'{"model":"minilm","input":"\xff"}', "not valid UTF-8"),
        ("/embed", b'{"inputs":"\xff\xfe"}', "not valid UTF-8"),
        ("/v1/embeddings", b'{"model":"minilm","input":' + b"[" * 1200 + b"]" * 1200 + b"}", "nested too deeply"),
        ("/embed", b'{"inputs":' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    ],
)
def test_bad_bytes_are_a_400_with_one_short_log_line(cli: CliGateway, path: str, body: bytes, needle: str) -> None:
    before = len(cli.lines)
    rid = f"bad-bytes-{time.monotonic_ns()}"
    r = httpx.post(cli.url + path, content=body, headers={"content-type": "application/json", "x-request-id": rid})
    assert r.status_code == 400, r.text
    message = r.json()["error"] if path == "/embed" else r.json()["error"]["message"]
    assert needle in message
    wait_until(lambda: any(rid in line for line in cli.lines[before:]), timeout=5)
    time.sleep(0.2)
    new = cli.lines[before:]
    assert len(new) == 1, new
    assert rid in new[0] and len(new[0]) < 400 and "Traceback" not in new[0]


def test_a_flood_of_garbage_is_rate_limited_in_the_log(cli: CliGateway) -> None:
    before = len(cli.lines)
    with httpx.Client(base_url=cli.url) as c:
        for _ in range(300):
            assert c.post("/v1/embeddings", content=b'{"input":"\xff"}').status_code == 400
    time.sleep(0.3)
    assert len(cli.lines) - before <= 40, len(cli.lines) - before


# -- 6. idle and slow connections cannot exhaust the process -------------------------------------------
def test_silent_and_slowloris_sockets_are_closed_and_normal_requests_pass_under_a_low_fd_limit(
    cli: CliGateway,
) -> None:
    host, port = cli.url.removeprefix("http://").split(":")
    held: list[socket.socket] = []
    try:
        for i in range(300):  # more sockets than the process has file descriptors (256)
            s = socket.create_connection((host, int(port)), timeout=5)
            if i % 3 == 0:
                s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")  # slowloris: headers never end
            held.append(s)
        # Normal requests still get through while those sockets are open...
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            codes = list(
                pool.map(
                    lambda i: (
                        httpx.post(
                            f"{cli.url}/v1/embeddings", json={"model": "minilm", "input": f"still here {i}"}, timeout=30
                        ).status_code
                    ),
                    range(20),
                )
            )
        assert codes == [200] * 20
        assert httpx.get(f"{cli.url}/ready").status_code == 200  # health checks to the backend still work
        # ...and every silent socket is closed by the gateway within the header timeout (1 s here).
        time.sleep(1.5)
        for s in held:
            s.settimeout(2)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(1024) == b""
    finally:
        for s in held:
            s.close()
    assert not any("Too many open files" in line for line in cli.lines)


def test_idle_keep_alive_connections_are_closed(primary: LlamaCppProcess) -> None:
    settings = settings_for([llamacpp_backend("a", primary.url)], keepalive_timeout_s=0.5)
    with run_gateway(settings) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in s.recv(4096)
        t = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server after the keep-alive timeout
        assert time.monotonic() - t < 3
        s.close()


# -- 9. shutdown and small things ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body"), [("/v1/embeddings", {"model": "minilm", "input": "x"}), ("/embed", {"inputs": "x"})]
)
def test_requests_that_outlive_the_shutdown_grace_get_503_in_their_dialect(path: str, body: dict[str, str]) -> None:
    with hanging_server() as hung:
        settings = settings_for([llamacpp_backend("hung", hung, timeout_s=60)], shutdown_grace_s=1)
        settings["consistency"] = {"enabled": False}
        with run_gateway(settings, wait_ready=False) as gw:
            result: list[httpx.Response] = []
            t = threading.Thread(target=lambda: result.append(httpx.post(gw.url + path, json=body, timeout=30)))
            t.start()
            wait_until(lambda: gw.runtime.states[0].in_flight == 1, timeout=10)
            gw.server.should_exit = True
            t.join(timeout=20)
    r = result[0]
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    if path == "/embed":
        assert r.json()["error_type"] == "Unhealthy"
    else:
        assert r.json()["error"]["code"] == "shutting_down"


def test_head_on_health_and_ready(primary: LlamaCppProcess) -> None:
    with run_gateway(settings_for([llamacpp_backend("a", primary.url)])) as gw:
        for path in ("/health", "/ready"):
            r = httpx.head(gw.url + path)
            assert r.status_code == 200 and r.content == b"" and r.headers["x-request-id"]


@pytest.fixture(scope="module")
def gw(primary: LlamaCppProcess) -> Iterator[RunningGateway]:
    with run_gateway(settings_for([llamacpp_backend("a", primary.url)])) as g:
        yield g


@pytest.mark.parametrize("text", ["", " ", "\t\n ", "\x00", "\x00\x00", "\u200b", "\u200b\u200c\ufeff", "\u3000"])
def test_texts_with_nothing_visible_are_400_in_both_dialects(gw: RunningGateway, text: str) -> None:
    r = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "minilm", "input": text})
    assert r.status_code == 400 and "no visible text" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "minilm", "input": ["fine", text]})
    assert r.status_code == 400 and "input[1]" in r.json()["error"]["message"]
    r = httpx.post(f"{gw.url}/embed", json={"inputs": [text]})
    assert r.status_code == 400 and r.json()["error_type"] == "Empty"


@pytest.mark.parametrize("text", ["a", " padded ", "tab\tand\nnewline", "x\u200b", "東京", "\U0001f600"])
def test_texts_with_something_visible_are_embedded(gw: RunningGateway, text: str) -> None:
    assert httpx.post(f"{gw.url}/v1/embeddings", json={"model": "minilm", "input": text}).status_code == 200
    assert httpx.post(f"{gw.url}/embed", json={"inputs": text}).status_code == 200


def test_empty_encoding_format_is_a_400(gw: RunningGateway) -> None:
    r = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "minilm", "input": "x", "encoding_format": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "encoding_format"


def test_retry_after_never_exceeds_the_next_health_check(llama_factory: object) -> None:
    from tests.helpers import embed

    proc = llama_factory("retry-after")  # type: ignore[operator]
    resilience = {"health_interval_s": 2.0, "breaker_cooldown_s": 30.0, "breaker_consecutive_failures": 1}
    with run_gateway(settings_for([llamacpp_backend("a", proc.url)], resilience=resilience)) as gw:
        proc.kill()
        codes = [embed(gw, "minilm", "x") for _ in range(3)]
        refused = [r for r in codes if r.status_code == 503]
        assert refused and all(1 <= int(r.headers["retry-after"]) <= 2 for r in refused), [
            r.headers.get("retry-after") for r in codes
        ]
