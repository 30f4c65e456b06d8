"""One llama.cpp server child process: spawn, wait until it serves, stop or kill.

Used by the gateway's supervisor and by the test fixtures, so both run the exact same server.

A child never outlives the gateway: it gets a parent-death signal (Linux), the xllamacpp child also
watches its parent, and a pidfile lets a restarted gateway find and stop a stale child still holding
its port. The API key reaches the child through the environment (`LLAMA_API_KEY`, which llama-server
reads too), never its command line, where `ps` would show it to every user of the machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
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

log = logging.getLogger(__name__)

API_KEY_ENV = "LLAMA_API_KEY"
_PR_SET_PDEATHSIG = 1
_CHILD_MARKERS = ("backends.managed.llamacpp_child", "llama-server")


# pidfile -> pid of the child this process runs under it (at most one live owner per pidfile).
_LIVE: dict[Path, int] = {}


class PortInUse(OSError):
    """The child's port is held by a process that is not a child of ours."""


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the parent dies (no-op where prctl is missing)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def stop_stale(pidfile: Path) -> int | None:
    """Stop a child a previous gateway left behind (its pid in `pidfile`); returns its pid if it was one."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return None
    if pid == os.getpid() or not any(m in cmdline for m in _CHILD_MARKERS):
        return None  # the pid was reused by something else: not ours to kill
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            time.sleep(0.1)
            if _gone(pid):
                return pid
        os.kill(pid, signal.SIGKILL)
    return pid


def _gone(pid: int) -> bool:
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()  # a zombie holds no port
    except OSError:
        return True


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
    pidfile: Path | None = None
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
        return cmd  # the API key travels in the environment (API_KEY_ENV), never on the command line

    def start(self) -> None:
        # A pidfile held by a child this process still runs is not stale: a reload is handing over.
        if self.pidfile is not None and self.pidfile not in _LIVE and (stale := stop_stale(self.pidfile)) is not None:
            log.warning("stopped a stale llama.cpp server (pid %s) left behind by an earlier gateway", stale)
        if port_in_use(self.host, self.port):
            raise PortInUse(f"port {self.port} on {self.host} is in use by another process")
        env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        env["EMBEDDING_GATEWAY_PARENT_PID"] = str(os.getpid())
        if self.api_key:
            env[API_KEY_ENV] = self.api_key
        # Own session: a signal aimed at the gateway's terminal does not reach the child first.
        popen = dict(
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            preexec_fn=_die_with_parent,
        )
        if self.log_path is None:
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, **popen)  # type: ignore[call-overload]
        else:
            with open(self.log_path, "ab") as out:
                self.proc = subprocess.Popen(self.command(), stdout=out, **popen)  # type: ignore[call-overload]
        if self.pidfile is not None and self.proc is not None:
            self.pidfile.parent.mkdir(parents=True, exist_ok=True)
            self.pidfile.write_text(f"{self.proc.pid}\n")
            _LIVE[self.pidfile] = self.proc.pid

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
            self._forget()
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self._forget()

    def _forget(self) -> None:
        """Drop our pidfile, unless a newer child (a reload's replacement) has taken it over."""
        if self.pidfile is None or self.proc is None:
            return
        if _LIVE.get(self.pidfile) == self.proc.pid:
            del _LIVE[self.pidfile]
            with contextlib.suppress(OSError):
                self.pidfile.unlink()
