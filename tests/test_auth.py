"""Caller keys, model access and quotas (issue 11): the real CLI gateway, real llama.cpp, real Redis."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.managed.process import LlamaCppProcess
from gateway.auth.keys import digest, new_key
from tests.conftest import RedisServer
from tests.helpers import cli_gateway, llamacpp_backend, wait_until

USER, OTHER, ADMIN, SLOW = new_key(), new_key(), new_key(), new_key()
MODELS = [{"name": "minilm", "profile": "all-minilm-l6-v2"}, {"name": "minilm-b", "profile": "all-minilm-l6-v2"}]


def key(name: str, secret: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "hash": digest(secret), **kw}


def settings(primary: LlamaCppProcess, auth: dict[str, Any]) -> dict[str, Any]:
    return {
        "resilience": {"health_interval_s": 0.5},
        "models": MODELS,
        "backends": [llamacpp_backend("a", primary.url), llamacpp_backend("b", primary.url, model="minilm-b")],
        "auth": {"enabled": True, **auth},
    }


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def embed(url: str, secret: str | None, model: str = "minilm", texts: Any = "hello", **kw: Any) -> httpx.Response:
    headers = bearer(secret) if secret else {}
    return httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": texts}, headers=headers, timeout=30, **kw)


def test_keys_access_and_dialects(primary: LlamaCppProcess) -> None:
    auth = {
        "keys": [
            key("team-a", USER, models=["minilm"], rpm=1000),
            key("team-b", OTHER, models=["minilm-b"]),
            key("ops", ADMIN, admin=True),
        ],
        "protect_views": True,
    }
    bodies: list[str] = []

    def keep(r: httpx.Response) -> httpx.Response:
        bodies.append(r.text + str(r.headers))
        return r

    with cli_gateway(settings(primary, auth)) as gw:
        url = gw.url
        # No key, wrong keys, malformed headers: 401 in each dialect, before anything else happens.
        r = keep(embed(url, None))
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = keep(httpx.post(f"{url}/embed", json={"inputs": "x"}))
        assert (
            r.status_code == 401
            and r.json()["error_type"] == "Unauthorized"
            and set(r.json())
            == {
                "error",
                "error_type",
            }
        )
        for headers in (
            bearer(new_key()),
            {"authorization": "Basic dXNlcjpwYXNz"},
            {"authorization": "Bearer"},
            {"authorization": USER},
            bearer("x" * 10_000),
            {"authorization": b"Bearer \xc3\xa9t\xc3\xa9"},  # type: ignore[dict-item]
            {"api-key": new_key()},
        ):
            r = keep(httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": "x"}, headers=headers))
            assert r.status_code == 401, (headers, r.text)
        r = keep(httpx.post(f"{url}/v1/embeddings?api_key={USER}", json={"model": "minilm", "input": "x"}))
        assert r.status_code == 401 and "not accepted in the URL" in r.json()["error"]["message"]
        # The right key (Bearer or api-key): served, with the quota headers.
        r = keep(embed(url, USER))
        assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "1000"
        assert int(r.headers["x-ratelimit-remaining-requests"]) == 999
        r = keep(httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": "x"}, headers={"api-key": USER}))
        assert r.status_code == 200
        # A model the key may not use reads exactly like one that does not exist.
        denied, missing = keep(embed(url, USER, model="minilm-b")), keep(embed(url, USER, model="nope"))
        assert denied.status_code == missing.status_code == 404
        assert "does not exist or you do not have access" in denied.json()["error"]["message"]
        assert denied.json()["error"]["message"].replace("minilm-b", "X") == missing.json()["error"]["message"].replace(
            "nope", "X"
        )
        assert keep(embed(url, OTHER, model="minilm-b")).status_code == 200
        # Views: a key is needed (protect_views) and /v1/models lists only the key's models.
        assert keep(httpx.get(f"{url}/v1/models")).status_code == 401
        listed = keep(httpx.get(f"{url}/v1/models", headers=bearer(USER))).json()["data"]
        assert [m["id"] for m in listed] == ["minilm"]
        assert keep(httpx.get(f"{url}/v1/models/minilm-b", headers=bearer(USER))).status_code == 404
        # Probes and metrics stay open.
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/ready").status_code == 200
        # Admin routes: 401 without a key, 403 with another one, 200 with an admin key.
        assert keep(httpx.post(f"{url}/v1/consistency")).status_code == 401
        forbidden = keep(httpx.post(f"{url}/v1/consistency", headers=bearer(USER)))
        assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "permission_denied"
        assert keep(httpx.post(f"{url}/v1/consistency", headers=bearer(ADMIN), timeout=60)).status_code == 200
        assert keep(httpx.get(f"{url}/v1/usage", headers=bearer(OTHER))).status_code == 403
        assert keep(httpx.post(f"{url}/v1/reload", headers=bearer(USER))).status_code == 403
        no_file = keep(httpx.post(f"{url}/v1/reload", headers=bearer(ADMIN)))
        assert no_file.status_code == 400 and "no configuration file" in no_file.json()["error"]["message"]
        usage = keep(httpx.get(f"{url}/v1/usage", headers=bearer(ADMIN))).json()
        team_a = next(k for k in usage["data"] if k["key"] == "team-a")
        assert team_a["since_start"]["requests"]["200"] == 3 and team_a["since_start"]["texts"]["minilm"] == 2
        assert team_a["since_start"]["rejections"]["model_not_allowed"] == 3  # two embeddings, one view
        assert usage["unauthenticated"]["invalid_key"] >= 10
        metrics = keep(httpx.get(f"{url}/metrics")).text
        assert 'embedding_gateway_key_requests_total{key="team-a",status="200"} 3.0' in metrics
        harmless = keep(
            httpx.post(f"{url}/v1/embeddings?monkey=1", json={"model": "minilm", "input": "x"}, headers=bearer(USER))
        )
        assert harmless.status_code == 200  # a parameter that merely ends in "key" is not a key
        time.sleep(0.5)  # the last log lines
        # No key ever appears in a log line, a body, a header we answered or the metrics.
        for secret in (USER, OTHER, ADMIN):
            assert not [line for line in gw.lines if secret in line]
            assert not [b for b in bodies if secret in b]


def fresh_window(window_s: int, need_s: float) -> None:
    """The sliding-window counters count per aligned window (and weigh the previous one in): start a
    burst with `need_s` left in the current window, so that it never straddles two."""
    left = window_s - time.time() % window_s
    if left < need_s:
        time.sleep(left + 0.05)


def test_quotas_admit_exactly_then_429_then_free_again(primary: LlamaCppProcess) -> None:
    auth = {"keys": [key("slow", SLOW, rpm=5), key("bulk", USER, texts_per_minute=20)], "window_s": 3}
    with cli_gateway(settings(primary, auth)) as gw:
        fresh_window(3, 2.5)
        statuses = [embed(gw.url, SLOW).status_code for _ in range(7)]
        assert statuses == [200] * 5 + [429] * 2
        limited = embed(gw.url, SLOW)
        assert (
            limited.json()["error"]["code"] == "rpm_exceeded" and limited.json()["error"]["type"] == "rate_limit_error"
        )
        h = limited.headers
        assert h["x-ratelimit-limit-requests"] == "5" and h["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(h["retry-after"]) <= 3 and re.fullmatch(r"\d+(ms|s)", h["x-ratelimit-reset-requests"])
        # Texts: a request costs its texts; one larger than the whole quota is told to split.
        assert embed(gw.url, USER, texts=["t"] * 15).status_code == 200
        over = embed(gw.url, USER, texts=["t"] * 10)
        assert over.status_code == 429 and over.json()["error"]["code"] == "texts_per_minute_exceeded"
        assert over.headers["x-ratelimit-remaining-texts"] == "5"
        huge = embed(gw.url, USER, texts=["t"] * 25)
        assert huge.status_code == 429 and "split it" in huge.json()["error"]["message"]
        time.sleep(6.2)  # two windows: the sliding window has forgotten them
        assert embed(gw.url, SLOW).status_code == 200
        assert embed(gw.url, USER, texts=["t"] * 20).status_code == 200


def _burst(urls: list[str], secret: str, n: int) -> list[int]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda i: embed(urls[i % len(urls)], secret).status_code, range(n)))


def test_two_gateways_sharing_redis_admit_the_limit_in_total(
    primary: LlamaCppProcess, redis_server: RedisServer
) -> None:
    auth = {"keys": [key("shared", SLOW, rpm=10)], "storage": redis_server.url, "window_s": 3600}
    with cli_gateway(settings(primary, auth)) as a, cli_gateway(settings(primary, auth)) as b:
        fresh_window(3600, 60)
        statuses = _burst([a.url, b.url], SLOW, 30)
        assert statuses.count(200) == 10 and statuses.count(429) == 20


def test_workers_sharing_redis_admit_the_limit_in_total_and_memory_never_more(
    primary: LlamaCppProcess, redis_server: RedisServer
) -> None:
    auth = {"keys": [key("shared", SLOW, rpm=10)], "storage": redis_server.url, "window_s": 3600}
    with cli_gateway(settings(primary, auth), args=("--workers", "2")) as gw:
        fresh_window(3600, 60)
        statuses = _burst([gw.url], SLOW, 30)
        assert statuses.count(200) == 10 and statuses.count(429) == 20
    # memory:// with 2 workers: each enforces half, so never more than the limit in total.
    auth = {"keys": [key("local", SLOW, rpm=10)], "window_s": 3600}
    with cli_gateway(settings(primary, auth), args=("--workers", "2")) as gw:
        fresh_window(3600, 60)
        statuses = _burst([gw.url], SLOW, 30)
        assert statuses.count(200) <= 10 and statuses.count(500) == 0


def test_redis_killed_mid_window_with_two_workers_never_admits_more_than_the_limit(
    primary: LlamaCppProcess, redis_server: RedisServer
) -> None:
    """Issue 17, item 4: 20 through Redis, then Redis dies; the local fallback starts from what each worker
    already admitted (it used to start from zero: 20 + 15 + 15 = 50 for rpm = 30)."""
    auth = {"keys": [key("shared", SLOW, rpm=30)], "storage": redis_server.url, "window_s": 3600}
    with cli_gateway(settings(primary, auth), args=("--workers", "2")) as gw:
        fresh_window(3600, 90)
        before = _burst([gw.url], SLOW, 20)
        assert before.count(200) == 20
        time.sleep(2.5)  # the workers pool what Redis told them through the control plane once a second
        redis_server.kill()
        after = _burst([gw.url], SLOW, 60)
        assert 500 not in after
        assert before.count(200) + after.count(200) <= 30, after
        assert after.count(200) >= 1  # still served: a fallback, not a refusal
        limited = embed(gw.url, SLOW)
        assert limited.status_code == 429 and limited.headers["x-ratelimit-limit-requests"] == "15"  # its share


def test_redis_back_after_an_outage_is_one_reconnect_without_flapping(
    primary: LlamaCppProcess, redis_server: RedisServer
) -> None:
    """Issue 18, item 7: after Redis came back the store flipped between unreachable and reachable 4 more
    times over ~20 s (stale pooled connections tried one by one)."""
    auth = {"keys": [key("shared", SLOW, rpm=100_000)], "storage": redis_server.url, "window_s": 3600}
    with cli_gateway(settings(primary, auth), args=("--workers", "2")) as gw, ThreadPoolExecutor(8) as pool:

        def burst(n: int) -> list[int]:
            return list(pool.map(lambda i: embed(gw.url, SLOW, texts=f"t{i}").status_code, range(n)))

        assert set(burst(32)) == {200}  # several pooled connections to Redis in each worker
        redis_server.kill()
        assert set(burst(16)) == {200}  # the local fallback
        redis_server.restart()
        end = time.monotonic() + 8
        while time.monotonic() < end:
            assert set(burst(8)) == {200}
            time.sleep(0.2)
        down = [line for line in gw.lines if "quota storage" in line and "unreachable" in line]
        back = [line for line in gw.lines if "quota storage reachable again" in line]
        assert len(down) <= 2 and len(back) == len(down), down + back  # once per worker, each way


@pytest.mark.parametrize("fallback", ["local", "reject"])
def test_redis_killed_mid_test_falls_back_logged_and_counted(
    primary: LlamaCppProcess, redis_server: RedisServer, fallback: str
) -> None:
    auth = {"keys": [key("shared", SLOW, rpm=6)], "storage": redis_server.url, "on_storage_error": fallback}
    auth["window_s"] = 3600
    with cli_gateway(settings(primary, auth)) as gw:
        fresh_window(3600, 60)
        assert [embed(gw.url, SLOW).status_code for _ in range(2)] == [200, 200]
        redis_server.kill()
        statuses = [embed(gw.url, SLOW).status_code for _ in range(10)]
        assert 500 not in statuses
        if fallback == "local":  # this process's counters, which already hold its 2: 4 more, then 429
            assert statuses == [200] * 4 + [429] * 6
        else:
            assert statuses == [503] * 10
            r = embed(gw.url, SLOW)
            assert r.json()["error"]["code"] == "quota_storage_unavailable" and "retry-after" in r.headers
        wait_until(lambda: any("quota storage" in line for line in gw.lines), timeout=5)
        assert len([line for line in gw.lines if "quota storage" in line and "unreachable" in line]) == 1
        metrics = httpx.get(f"{gw.url}/metrics").text
        errors = re.search(r"^embedding_gateway_ratelimit_storage_errors_total (\S+)$", metrics, re.M)
        assert errors is not None and float(errors.group(1)) >= 1


def test_keys_new_prints_a_key_once_and_a_loadable_entry(tmp_path: Path, primary: LlamaCppProcess) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "keys", "new", "--name", "team-x", "--rpm", "60", "--admin"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    ).stdout
    secret = re.search(r"(egk_\S+)", out)
    assert secret is not None and len(secret.group(1)) >= 4 + 32  # >= 128 bits after the prefix
    entry = out[out.index("[[auth.keys]]") :]
    assert secret.group(1) not in entry and digest(secret.group(1)) in entry
    config = tmp_path / "gw.toml"
    config.write_text(
        f'[auth]\nenabled = true\n[[models]]\nname = "minilm"\nprofile = "all-minilm-l6-v2"\n'
        f'[[backends]]\nname = "a"\nkind = "llamacpp"\nmodel = "minilm"\nurl = "{primary.url}"\n' + entry
    )
    with cli_gateway(config) as gw:
        assert embed(gw.url, secret.group(1)).status_code == 200
        assert httpx.get(f"{gw.url}/v1/usage", headers=bearer(secret.group(1))).status_code == 200
        reloaded = httpx.post(f"{gw.url}/v1/reload", headers=bearer(secret.group(1)), timeout=60)
        assert reloaded.status_code == 200 and reloaded.json() == {"status": "reloaded"}
        assert embed(gw.url, secret.group(1)).status_code == 200  # the key works after the reload too
