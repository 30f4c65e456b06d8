"""Live reload (issue 10, item 5): SIGHUP re-reads the config file of the real CLI gateway."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from backends.managed.process import LlamaCppProcess
from tests.helpers import cli_gateway, embed_url, llamacpp_backend, wait_until
from tests.servers.base import Fault
from tests.servers.tei import TeiServer

TeiFactory = Callable[..., tuple[str, TeiServer]]


def write(path: Path, backends: list[dict[str, Any]], extra: str = "") -> Path:
    lines = ["[server]", 'log_level = "info"', extra, "[resilience]", "health_interval_s = 0.5"]
    lines += ["[[models]]", 'name = "minilm"', 'profile = "all-minilm-l6-v2"']
    for b in backends:
        lines.append("[[backends]]")
        lines += [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in b.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def names(url: str) -> list[str]:
    return [b["name"] for b in httpx.get(f"{url}/v1/backends").json()["data"]]


def test_sighup_adds_removes_and_refuses_a_bad_config(
    tmp_path: Path, tei_factory: TeiFactory, primary: LlamaCppProcess, fallback: LlamaCppProcess
) -> None:
    tei_url, tei = tei_factory()
    config = write(tmp_path / "gw.toml", [{"name": "tei", "kind": "tei", "model": "minilm", "url": tei_url}])
    with cli_gateway(config) as gw:
        assert embed_url(gw.url, "first").headers["x-embedding-backend"] == "tei"
        # A slow request in flight on the old configuration...
        tei.inject(Fault("latency", seconds=2.0))
        slow: list[httpx.Response] = []
        t = threading.Thread(target=lambda: slow.append(embed_url(gw.url, "slow, in flight during the reload")))
        t.start()
        time.sleep(0.3)
        # ...while the file changes: tei removed, two llama.cpp backends added.
        write(config, [llamacpp_backend("a", primary.url), llamacpp_backend("b", fallback.url, priority=1)])
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: names(gw.url) == ["a", "b"], timeout=30)
        r = embed_url(gw.url, "after the reload")
        assert r.status_code == 200 and r.headers["x-embedding-backend"] == "a"
        t.join(timeout=30)
        assert slow[0].status_code == 200 and slow[0].headers["x-embedding-backend"] == "tei"  # finished on the old
        assert httpx.get(f"{gw.url}/ready").status_code == 200
        # A bad file: the running configuration stays, one line names the field.
        before = len(gw.lines)
        config.write_text(config.read_text().replace('kind = "llamacpp"', 'kind = "llamacpp"\nbogus_key = 1', 1))
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: any("reload refused" in line for line in gw.lines[before:]), timeout=10)
        refused = [line for line in gw.lines[before:] if "reload refused" in line]
        assert len(refused) == 1 and "backends[0].bogus_key" in refused[0]
        assert names(gw.url) == ["a", "b"] and embed_url(gw.url, "still serving").status_code == 200


def test_a_changed_config_file_is_reloaded_when_watched(
    tmp_path: Path, primary: LlamaCppProcess, fallback: LlamaCppProcess
) -> None:
    config = write(tmp_path / "gw.toml", [llamacpp_backend("a", primary.url)], extra="watch_config = true")
    with cli_gateway(config) as gw:
        assert names(gw.url) == ["a"]
        write(config, [llamacpp_backend("b", fallback.url)], extra="watch_config = true")
        wait_until(lambda: names(gw.url) == ["b"], timeout=30)  # no signal sent
        assert embed_url(gw.url, "from the watched file").headers["x-embedding-backend"] == "b"
        assert any("changed: reloading" in line for line in gw.lines)


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_reload_keeps_an_unchanged_managed_server_and_replaces_a_changed_one(tmp_path: Path, minilm_gguf: Path) -> None:
    def managed(parallel: int) -> dict[str, Any]:
        return {"name": "local", "kind": "llamacpp", "model": "minilm"}

    def config(parallel: int, priority: int = 0) -> Path:
        path = write(tmp_path / "gw.toml", [managed(parallel)])
        text = path.read_text() + (
            f"priority = {priority}\n[backends.managed]\n"
            f'gguf = "{minilm_gguf}"\nthreads = 1\nparallel = {parallel}\ncache_dir = "{tmp_path}"\n'
        )
        path.write_text(text)
        return path

    def pid(url: str) -> int:
        return int(httpx.get(f"{url}/v1/backends").json()["data"][0]["managed"]["pid"])

    with cli_gateway(config(1)) as gw:
        first = pid(gw.url)
        config(1, priority=1)  # the managed server's own settings are unchanged: it is handed over
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: httpx.get(f"{gw.url}/v1/backends").json()["data"][0]["priority"] == 1, timeout=30)
        assert pid(gw.url) == first and _alive(first)
        config(2, priority=1)  # now they changed: a new child, and the old one is stopped
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: pid(gw.url) != first, timeout=30)
        wait_until(lambda: not _alive(first), timeout=30)
        assert embed_url(gw.url, "served by the new child").status_code == 200
