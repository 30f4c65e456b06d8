"""Test helpers: run the gateway in-process on a real port; build settings for test backends."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import uvicorn

from backends.managed.process import free_port
from config.settings import GatewaySettings
from gateway.api.context import RequestContext
from gateway.app import create_app


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
def run_asgi(app: Any, *, log_level: str = "warning") -> Iterator[tuple[str, uvicorn.Server]]:
    """Serve an ASGI app on a free loopback port in a background thread."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level, lifespan="on"))
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
        settings = GatewaySettings.model_validate(settings)
    app = create_app(settings)
    with run_asgi(app) as (url, server):
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
