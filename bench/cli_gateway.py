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

ROOT = Path(__file__).resolve().parent.parent


def wait_ready(url: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gateway at {url} not ready after {timeout:.0f}s")


@contextmanager
def cli_gateway(work: Path, config_text: str, port: int, *, ready: bool = True) -> Iterator[tuple[str, int]]:
    """Yields the gateway's URL and pid."""
    config = work / f"gateway-{port}.toml"
    config.write_text(config_text)
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        if ready:
            wait_ready(url)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
