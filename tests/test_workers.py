"""`serve --workers N` (issue 10): one control plane, N workers, one port; the real CLI throughout."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import cli_gateway, embed_url, wait_until
from tests.servers.base import Fault, is_probe
from tests.servers.tei import TeiServer
from tests.test_reload import write

TeiFactory = Callable[..., tuple[str, TeiServer]]
TWO = ("--workers", "2")


def tei(name: str, url: str, priority: int = 0) -> dict[str, Any]:
    return {"name": name, "kind": "tei", "model": "minilm", "url": url, "priority": priority}


def probe_calls(server: TeiServer) -> int:
    """Calls the gateway made on its own: health checks, health probes, agreement probes."""
    return sum(1 for r in server.received if r.method == "GET" or is_probe(r.body))


def client_calls(server: TeiServer) -> int:
    return sum(1 for r in server.received if r.method == "POST" and r.body and not is_probe(r.body))


def fresh(url: str, path: str) -> httpx.Response:
    """One request on a connection of its own (so any worker may accept it)."""
    return httpx.get(f"{url}{path}", headers={"connection": "close"}, timeout=10)


def counter(metrics: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}\{{{want}[^}}]*\}} (\S+)$", metrics, re.M))


def probes_in(server: TeiServer, seconds: float) -> int:
    before = probe_calls(server)
    time.sleep(seconds)
    return probe_calls(server) - before


def test_two_workers_one_control_plane(tmp_path: Path, tei_factory: TeiFactory) -> None:
    primary_url, primary = tei_factory()
    spare_url, spare = tei_factory()
    config = write(tmp_path / "gw.toml", [tei("primary", primary_url), tei("spare", spare_url, priority=1)])
    # Probe traffic with one worker, as the baseline.
    with cli_gateway(config) as gw:
        one = probes_in(primary, 3.0)
    with cli_gateway(config, args=TWO) as gw:
        two = probes_in(primary, 3.0)
        assert 0 < two <= one * 1.5 + 2, (one, two)  # not doubled: the checks run once

        # Both workers answer, on one port.
        with ThreadPoolExecutor(16) as pool:
            workers = {r.json()["worker"] for r in pool.map(lambda _: fresh(gw.url, "/health"), range(200))}
        assert workers == {0, 1}

        # Requests spread over both workers add up in /metrics and in the shared /v1/backends view.
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda i: embed_url(gw.url, f"text {i}").status_code, range(60)))
        assert statuses == [200] * 60
        metrics = fresh(gw.url, "/metrics").text
        assert counter(metrics, "embedding_gateway_requests_total", route="/v1/embeddings", status="200") == 60
        assert counter(metrics, "embedding_gateway_inputs_total", model="minilm") == 60
        view = fresh(gw.url, "/v1/backends").json()
        assert view["workers"] == 2 and len({p["pid"] for p in view["worker_processes"]}) == 2

        seen: list[object] = []
        answered = ("ok", "unavailable", "timeout", "overloaded", "misconfigured", "bad_output")

        def calls_add_up() -> bool:  # backend calls (concurrent requests may share one: coalescing)
            data = fresh(gw.url, "/v1/backends").json()["data"]
            metrics = fresh(gw.url, "/metrics").text
            calls = {
                f"{b}/{outcome}": n
                for b in ("primary", "spare")
                for outcome in answered
                if (n := counter(metrics, "embedding_gateway_backend_calls_total", backend=b, outcome=outcome))
            }
            seen[:] = [{b["name"]: b["requests"] for b in data}, calls]
            # A backend's `requests` are its calls that succeeded or failed on their own (a failed one was
            # retried on the other backend: every client request still got 200).
            ok = sum(n for name, n in calls.items() if name.endswith("/ok"))
            return 0 < sum(b["requests"] for b in data) == sum(calls.values()) and ok <= 60

        try:
            wait_until(calls_add_up, timeout=10)  # the workers report their figures every second
        except AssertionError:
            raise AssertionError(f"requests per backend vs calls: {seen}; {gw.lines[-20:]}") from None

        # The primary fails its health checks: the control plane takes it out of every worker's routing.
        primary.faults_hit_probes = True
        primary.inject(Fault("status", status=503, times=-1))
        wait_until(lambda: fresh(gw.url, "/v1/backends").json()["data"][0]["healthy"] is False, timeout=5)
        time.sleep(0.2)  # one snapshot push
        before = client_calls(primary)
        with ThreadPoolExecutor(8) as pool:
            served = list(pool.map(lambda i: embed_url(gw.url, f"after {i}"), range(40)))
        assert {r.status_code for r in served} == {200}
        assert {r.headers["x-embedding-backend"] for r in served} == {"spare"}
        assert client_calls(primary) == before  # no worker even tried it
        assert client_calls(spare) > 0


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_one_managed_child_for_two_workers_and_no_orphans(tmp_path: Path, minilm_gguf: Path) -> None:
    config = write(tmp_path / "gw.toml", [{"name": "local", "kind": "llamacpp", "model": "minilm"}])
    config.write_text(
        config.read_text() + f'[backends.managed]\ngguf = "{minilm_gguf}"\nthreads = 1\ncache_dir = "{tmp_path}"\n'
    )
    with cli_gateway(config, args=TWO) as gw:
        children = _children(gw.proc.pid)
        servers = [c for c in children if "llama" in _cmdline(c) or "xllamacpp" in _cmdline(c)]
        workers = [c for c in children if "gateway.worker" in _cmdline(c)]
        assert len(servers) == 1 and len(workers) == 2, [_cmdline(c) for c in children]
        with ThreadPoolExecutor(4) as pool:
            assert {r.status_code for r in pool.map(lambda i: embed_url(gw.url, f"t{i}"), range(20))} == {200}
        view = fresh(gw.url, "/v1/backends").json()["data"][0]
        assert view["managed"]["pid"] == servers[0]
        # A worker that dies is replaced; the managed server is untouched.
        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: len([c for c in _children(gw.proc.pid) if "gateway.worker" in _cmdline(c)]) == 2, 10)
        assert _alive(servers[0]) and embed_url(gw.url, "after a worker died").status_code == 200
        everyone = [c for c in _children(gw.proc.pid)]
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(timeout=30) == 0
    wait_until(lambda: not any(_alive(p) for p in everyone), timeout=10)


def test_parent_killed_takes_its_workers_and_child_along(tmp_path: Path, minilm_gguf: Path) -> None:
    config = write(tmp_path / "gw.toml", [{"name": "local", "kind": "llamacpp", "model": "minilm"}])
    config.write_text(
        config.read_text() + f'[backends.managed]\ngguf = "{minilm_gguf}"\nthreads = 1\ncache_dir = "{tmp_path}"\n'
    )
    with cli_gateway(config, args=TWO) as gw:
        everyone = _children(gw.proc.pid)
        assert len(everyone) == 3
        gw.proc.kill()  # no chance to clean up: the children must notice on their own
        gw.proc.wait()
        wait_until(lambda: not any(_alive(p) for p in everyone), timeout=30)


def test_sighup_with_workers_replaces_them_and_keeps_serving(tmp_path: Path, tei_factory: TeiFactory) -> None:
    a_url, a = tei_factory()
    b_url, _ = tei_factory()
    config = write(tmp_path / "gw.toml", [tei("a", a_url)])
    with cli_gateway(config, args=TWO) as gw:
        # Ready means one worker serves; both must, or the one still starting is missed below and, retiring
        # after the reload, may answer with the removed backend while the test thinks every old worker left.
        wait_until(lambda: len(fresh(gw.url, "/v1/backends").json().get("worker_processes", [])) == 2, timeout=60)
        pids = {p["pid"] for p in fresh(gw.url, "/v1/backends").json()["worker_processes"]}
        a.inject(Fault("latency", seconds=2.0))
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(embed_url, gw.url, "in flight during the reload")
            time.sleep(0.3)
            write(config, [tei("b", b_url)])
            gw.proc.send_signal(signal.SIGHUP)

            def replaced() -> bool:
                body = fresh(gw.url, "/v1/backends").json()
                now = {p["pid"] for p in body.get("worker_processes", [])}
                return [d["name"] for d in body["data"]] == ["b"] and len(now) == 2 and not now & pids

            wait_until(replaced, timeout=60)
            assert slow.result().status_code == 200 and slow.result().headers["x-embedding-backend"] == "a"
        # A retiring worker may still accept for a moment after it left the control plane: wait for it to go.
        wait_until(lambda: not any(_alive(p) for p in pids), timeout=30)
        served = [embed_url(gw.url, f"after {i}") for i in range(10)]
        assert {(r.status_code, r.headers["x-embedding-backend"]) for r in served} == {(200, "b")}, (
            fresh(gw.url, "/v1/backends").json().get("worker_processes"),
            [ln[:160] for ln in gw.lines if "worker" in ln or "reload" in ln][-12:],
        )
        # A bad file: everything keeps running as it was, one line names the field.
        before = len(gw.lines)
        config.write_text(config.read_text().replace('kind = "tei"', 'kind = "tei"\nbogus_key = 1', 1))
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: any("reload refused" in line for line in gw.lines[before:]), timeout=10)
        assert embed_url(gw.url, "still serving").status_code == 200


def test_ten_sighups_under_load_are_at_most_two_reloads_and_refuse_nothing(
    tmp_path: Path, tei_factory: TeiFactory
) -> None:
    """Issue 18, item 5: reloads that arrive while one runs merge into one follow-up reload."""
    a_url, _ = tei_factory()
    config = write(tmp_path / "gw.toml", [tei("a", a_url)])
    with cli_gateway(config, args=TWO) as gw:
        stop = time.monotonic() + 1e9
        outcomes: list[str] = []
        resets: list[str] = []  # connections reset before an answer, each retried once

        def load(k: int) -> None:
            # A new connection per request, and one retry of a connection reset before any answer, as the OpenAI
            # SDK does: a retiring worker closes a connection it accepted but has no request on yet (a known race
            # of rolling restarts, about 1 request in 500, see the README's troubleshooting). Counted below.
            with httpx.Client(timeout=30, headers={"connection": "close"}) as c:
                i = 0
                while time.monotonic() < stop:
                    body = {"model": "minilm", "input": f"load {k} {i}"}
                    for attempt in (1, 2):
                        try:
                            outcomes.append(str(c.post(f"{gw.url}/v1/embeddings", json=body).status_code))
                            break
                        except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
                            if attempt == 2:
                                outcomes.append(type(exc).__name__)
                            else:
                                resets.append(type(exc).__name__)
                        except httpx.HTTPError as exc:
                            outcomes.append(type(exc).__name__)
                            break
                    i += 1

        with ThreadPoolExecutor(4) as pool:
            for k in range(4):
                pool.submit(load, k)
            for _ in range(10):  # all within the first reload (its roll of two workers takes seconds)
                gw.proc.send_signal(signal.SIGHUP)
                time.sleep(0.1)
            wait_until(lambda: any("workers replaced after the reload" in line for line in gw.lines), timeout=60)
            time.sleep(3)  # a follow-up reload, if one was merged, starts at once: let it finish too
            wait_until(
                lambda: (
                    sum("configuration reloaded" in line for line in gw.lines)
                    == sum("workers replaced after the reload" in line for line in gw.lines)
                ),
                timeout=60,
            )
            stop = time.monotonic()
        reloads = sum("configuration reloaded" in line for line in gw.lines)
        assert 1 <= reloads <= 2, "\n".join(line[:200] for line in gw.lines if "reload" in line)
        assert outcomes and set(outcomes) == {"200"}, {o: outcomes.count(o) for o in set(outcomes)}
        assert len(resets) <= max(2, len(outcomes) // 100), resets  # rare, or it is not the race
