"""Test helpers: run the gateway in-process on a real port; build settings for test backends."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn

from backends.managed.process import free_port
from config.settings import GatewaySettings, load_spaces_of
from gateway.api.context import RequestContext
from gateway.app import create_app
from gateway.server import uvicorn_config


@dataclass
class RunningGateway:
    url: str
    app: RequestContext
    server: uvicorn.Server

    @property
    def runtime(self) -> Any:
        return self.app.state.runtime

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, **kw)


@contextmanager
def run_asgi(
    app: Any, *, log_level: str = "warning", config: uvicorn.Config | None = None
) -> Iterator[tuple[str, uvicorn.Server]]:
    """Serve an ASGI app on a free loopback port in a background thread."""
    port = free_port()
    config = config or uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level, lifespan="on")
    config.port = port
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def run_gateway(settings: GatewaySettings | dict[str, Any], *, wait_ready: bool = True) -> Iterator[RunningGateway]:
    if isinstance(settings, dict):
        settings = GatewaySettings.model_validate(without_cache(settings))
        load_spaces_of(settings, None)  # pinned space files, as load_settings() would
    app = create_app(settings)
    config = uvicorn_config(app, settings.server, host="127.0.0.1", log_level="warning")
    with run_asgi(app, config=config) as (url, server):
        gw = RunningGateway(url, app, server)
        deadline = time.monotonic() + 60
        while wait_ready and not _settled(gw.url):
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not ready: {httpx.get(f'{gw.url}/ready').text}")
            time.sleep(0.05)
        yield gw


def _settled(url: str) -> bool:
    """Ready, and the agreement checker's first pass is done (so fallbacks are verified)."""
    if httpx.get(f"{url}/ready").status_code != 200:
        return False
    body = httpx.get(f"{url}/v1/consistency").json()
    return not body["enabled"] or all("checked_at" in r for r in body["data"])


def llamacpp_backend(name: str, url: str, model: str = "minilm", priority: int = 0, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "llamacpp", "model": model, "url": url, "priority": priority, **kw}


def settings_for(
    backends: list[dict[str, Any]],
    models: list[dict[str, Any]] | None = None,
    resilience: dict[str, Any] | None = None,
    **server: Any,
) -> dict[str, Any]:
    models = models or [{"name": "minilm", "profile": "all-minilm-l6-v2"}]
    # Fast health checks keep tests short; everything else is the production default.
    return {
        "server": server,
        "resilience": {"health_interval_s": 0.5, **(resilience or {})},
        "models": models,
        "backends": backends,
    }


def without_cache(settings: dict[str, Any]) -> dict[str, Any]:
    """The embedding cache off unless a test asks for it: routing, failover and agreement tests repeat
    texts and must reach the backends (tests/test_cache.py turns it on)."""
    return settings if "cache" in settings else {**settings, "cache": {"enabled": False}}


def direct_embeddings(url: str, texts: list[str]) -> np.ndarray:
    """Vectors straight from a llama.cpp server, no gateway involved."""
    r = httpx.post(f"{url}/v1/embeddings", json={"input": texts}, timeout=30)
    r.raise_for_status()
    data = sorted(r.json()["data"], key=lambda d: d["index"])
    return np.asarray([d["embedding"] for d in data], dtype=np.float32)


def unit(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(unit(a.astype(np.float64)) * unit(b.astype(np.float64)), axis=1)


# The MiniLM GGUF under two profiles: as is, and with Matryoshka dimensions and prompts, to exercise
# slicing and prompt application on a real model.
MINILM = {"name": "minilm", "profile": "all-minilm-l6-v2"}
MINILM_MRL = {
    "name": "minilm-mrl",
    "profile": "all-minilm-l6-v2",
    "matryoshka_dimensions": [64, 128],
    "prompts": {"query": "query: ", "document": "passage: "},
    "default_prompt_name": "document",
}
TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply today.", "naïve café ✓ 東京"]


def embed(gw: RunningGateway, model: str, texts: list[str] | str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/embeddings", json={"model": model, "input": texts, **extra}, timeout=60)


def vectors_of(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    data = sorted(resp.json()["data"], key=lambda d: d["index"])
    return np.asarray([d["embedding"] for d in data], dtype=np.float32)


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def answers_200(url: str) -> bool:
    """GET `url` is 200 (False while nothing listens yet)."""
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def hanging_server() -> Iterator[str]:
    """Accepts connections and never answers: the worst kind of backend."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held: list[socket.socket] = []
    alive = True

    def accept() -> None:
        while alive:
            try:
                held.append(sock.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        alive = False
        sock.close()
        for c in held:
            c.close()


@dataclass
class CliGateway:
    url: str
    proc: subprocess.Popen[bytes]
    lines: list[str]  # its output so far (stdout and stderr), read continuously


@contextmanager
def cli_gateway(
    settings: dict[str, Any] | Path,
    *,
    limit_fds: int | None = None,
    extra_env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    ready_path: str = "/ready",
) -> Iterator[CliGateway]:
    """The real `embedding-gateway serve` in its own process (settings through the environment), its
    output collected line by line; optionally with a low open-files limit."""
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("EMBEDDING_GATEWAY_") or k in ("EMBEDDING_GATEWAY_SPACES_DIR", "EMBEDDING_GATEWAY_PEERS")
    }
    config = ["--config", str(settings)] if isinstance(settings, Path) else []
    if isinstance(settings, Path):
        env.setdefault("EMBEDDING_GATEWAY_CACHE__ENABLED", "false")  # see without_cache()
    for key, value in {} if isinstance(settings, Path) else without_cache(settings).items():
        env[f"EMBEDDING_GATEWAY_{key.upper()}"] = json.dumps(value)
    env.update(extra_env or {})

    def limit() -> None:
        if limit_fds is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit_fds, limit_fds))

    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", *config, "--host", "127.0.0.1", "--port", str(port), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).parent.parent,
        preexec_fn=limit,
    )
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace").rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not answers_200(f"{url}{ready_path}"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not become ready (exit {proc.poll()}): {lines[-20:]}")
            time.sleep(0.1)
        yield CliGateway(url, proc, lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=5)


def embed_url(url: str, texts: list[str] | str, model: str = "minilm") -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": texts}, timeout=60)


def record_space(tmp: Path, backend: dict[str, Any]) -> Path:
    """`space record` of one backend into tmp/space.json (through the CLI, as an operator would)."""
    config = tmp / "record.toml"
    lines = ["[[models]]", 'name = "minilm"', 'profile = "all-minilm-l6-v2"', "[[backends]]"]
    config.write_text("\n".join(lines + [f"{k} = {json.dumps(v)}" for k, v in backend.items()]) + "\n")
    out = tmp / "space.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "space",
            "record",
            "--config",
            str(config),
            "--model",
            "minilm",
            "--out",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0, done.stderr
    return out
