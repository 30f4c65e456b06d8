"""One llama.cpp server child process: spawn, wait until it serves, stop or kill.

Used by the gateway's supervisor and by the test fixtures, so both run the exact same server.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LlamaCppProcess:
    gguf: Path
    port: int = 0
    host: str = "127.0.0.1"
    pooling: str | None = None
    ctx_size: int = 2048
    batch_size: int = 512
    parallel: int = 4
    threads: int = 0
    api_key: str | None = None
    binary: str = "auto"  # auto | xllamacpp | llama-server
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.port == 0:
            self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        common = [
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--ctx-size",
            str(self.ctx_size),
            "--batch-size",
            str(self.batch_size),
            "--parallel",
            str(self.parallel),
        ]
        binary = shutil.which("llama-server") if self.binary in ("auto", "llama-server") else None
        if self.binary == "llama-server" and binary is None:
            raise FileNotFoundError("binary = 'llama-server' but no llama-server is on PATH")
        if binary:
            cmd = [binary, "--model", str(self.gguf), "--embeddings", *common, "--ubatch-size", str(self.batch_size)]
            if self.threads:
                cmd += ["--threads", str(self.threads)]
        else:
            cmd = [sys.executable, "-m", "backends.managed.llamacpp_child", "--model", str(self.gguf), *common]
            if self.threads:
                cmd += ["--threads", str(self.threads)]
        if self.pooling:
            cmd += ["--pooling", self.pooling]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd

    def start(self) -> None:
        # Own session: a signal aimed at the gateway's terminal does not reach the child first.
        popen = dict(
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if self.log_path is None:
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, **popen)  # type: ignore[call-overload]
            return
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, **popen)  # type: ignore[call-overload]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"llama.cpp server exited with {self.proc and self.proc.returncode} before serving")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"llama.cpp server on {self.url} not ready after {timeout_s:.0f}s")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, grace_s: float = 5.0) -> None:
        if self.proc is None or not self.alive():
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
