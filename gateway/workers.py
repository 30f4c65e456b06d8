"""`embedding-gateway serve --workers N`: one control plane, N worker processes on one port.

The parent binds the port, runs the control plane (the one runtime with health checks, agreement
checks and managed llama.cpp servers) and starts N workers that inherit the listening socket and
serve from the control plane's snapshots. So probe traffic and managed children do not grow with N.

- A worker that dies is restarted (backing off if it keeps dying); its live gauges are dropped.
- SIGTERM/SIGINT: the workers stop gracefully (in-flight requests finish within
  `server.shutdown_grace_s`), then the control plane and its managed servers. Workers also stop when
  the parent dies (parent-death signal, and the control channel closing).
- SIGHUP (or a changed file with `server.watch_config`): the control plane reloads as a single process
  does; then the workers are replaced one by one, each new one serving before the old one drains.
- Metrics: every process writes to `PROMETHEUS_MULTIPROC_DIR` (a fresh directory per run), which
  `/metrics` in any worker adds up.

Why uvicorn workers of our own rather than `uvicorn --workers` or granian: the parent must also be the
control plane (uvicorn's supervisor runs no application code), and the connection guards in
`gateway/server.py` are uvicorn protocol classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from config.settings import GatewaySettings, ServerSettings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_RESTART_BACKOFF_MAX_S = 30.0
_START_LIMIT_S = 60.0  # a replacement worker must be serving within this long in a rolling restart


def worker_count(value: str) -> int:
    """`--workers`: a number, or `auto` for the CPUs this process may run on."""
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    n = int(value)  # argparse turns a ValueError into "invalid worker_count value"
    if n < 1:
        raise ValueError(n)
    return n


def bind(server: ServerSettings) -> socket.socket:
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    sock = socket.create_server((server.host, server.port), family=family, backlog=4096)
    sock.set_inheritable(True)
    return sock


def _stop_with_parent() -> None:
    """In a worker, before exec: SIGTERM (a graceful stop) when the parent dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def serve_workers(settings: GatewaySettings, config_path: Path | None, workers: int) -> int:
    if "prometheus_client" in sys.modules:
        raise RuntimeError("serve_workers must run before prometheus_client is imported (multiprocess metrics)")
    run_dir = Path(tempfile.mkdtemp(prefix="embedding-gateway-"))
    metrics_dir = run_dir / "metrics"
    metrics_dir.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # inherited by the workers
    try:
        sock = bind(settings.server)
        return asyncio.run(Parent(settings, config_path, workers, sock, run_dir).run())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


class Parent:
    def __init__(
        self, settings: GatewaySettings, config_path: Path | None, n: int, sock: socket.socket, run_dir: Path
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.n = n
        self.sock = sock
        self.control_path = run_dir / "control.sock"
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._retiring: list[subprocess.Popen[bytes]] = []
        self._stopping = False
        self._restarts: dict[int, tuple[int, float]] = {}  # id -> (quick deaths in a row, next start at)
        self._roll_lock = asyncio.Lock()

    def spawn(self, worker_id: int) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "gateway.worker", "--fd", str(self.sock.fileno())]
        cmd += ["--control", str(self.control_path), "--id", str(worker_id)]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        proc = subprocess.Popen(cmd, pass_fds=(self.sock.fileno(),), preexec_fn=_stop_with_parent)
        log.info("worker %d started (pid %d)", worker_id, proc.pid)
        return proc

    async def run(self) -> int:
        from gateway.control.plane import ControlPlane
        from gateway.reload import Reloader
        from gateway.runtime import Runtime

        loop = asyncio.get_running_loop()
        holder = SimpleNamespace(runtime=Runtime(self.settings))
        holder.runtime.start()
        self.plane = ControlPlane(holder, self.control_path, self.n)
        await self.plane.start()
        reloader = Reloader(holder, self.config_path, after=self.roll)  # type: ignore[arg-type]
        host, port = self.sock.getsockname()[:2]
        log.info("control plane (pid %d): %d workers serving http://%s:%d", os.getpid(), self.n, host, port)
        self.procs = {i: self.spawn(i) for i in range(self.n)}
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks = [asyncio.create_task(self._watch_workers(), name="watch-workers")]
        if self.config_path is not None:
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reloader.reload()))
            if self.settings.server.watch_config:
                tasks.append(asyncio.create_task(reloader.watch(self.config_path), name="watch-config"))
        await stop.wait()
        log.info("stopping: %d workers, then the control plane", len(self.procs))
        self._stopping = True
        for task in tasks:
            task.cancel()
        await self._stop_workers([*self.procs.values(), *self._retiring])
        await self.plane.stop()
        await holder.runtime.stop()
        return 0

    async def _watch_workers(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self._reap()
            for worker_id, proc in list(self.procs.items()):
                if proc.poll() is None:
                    continue
                deaths, not_before = self._restarts.get(worker_id, (0, 0.0))
                if time.monotonic() < not_before:
                    continue
                log.error("worker %d (pid %d) exited with status %s: restarting", worker_id, proc.pid, proc.returncode)
                _forget(proc.pid)
                self.procs[worker_id] = self.spawn(worker_id)
                delay = min(_RESTART_BACKOFF_MAX_S, 0.5 * 2**deaths)
                self._restarts[worker_id] = (deaths + 1, time.monotonic() + delay)

    def _reap(self) -> None:
        for proc in [p for p in self._retiring if p.poll() is not None]:
            self._retiring.remove(proc)
            _forget(proc.pid)

    async def roll(self) -> None:
        """After a reload: replace the workers one at a time; each old one stops once its successor
        serves, finishing its in-flight requests (the listening socket is shared: nothing is refused)."""
        async with self._roll_lock:
            for worker_id in range(self.n):
                if self._stopping:
                    return
                new = self.spawn(worker_id)
                end = time.monotonic() + _START_LIMIT_S
                while not self.plane.serving(new.pid) and new.poll() is None and time.monotonic() < end:
                    await asyncio.sleep(0.05)
                if not self.plane.serving(new.pid):  # never stop a worker before its successor serves
                    log.error("reload: worker %d's successor did not start serving; the old worker stays", worker_id)
                    if new.poll() is None:
                        new.kill()
                        new.wait()
                    _forget(new.pid)
                    continue
                old = self.procs[worker_id]
                self.procs[worker_id] = new
                self._restarts.pop(worker_id, None)
                if old.poll() is None:
                    old.send_signal(signal.SIGTERM)
                    self._retiring.append(old)
            log.info("workers replaced after the reload")

    async def _stop_workers(self, procs: list[subprocess.Popen[bytes]]) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + self.settings.server.shutdown_grace_s + 5
        while any(p.poll() is None for p in procs) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for proc in procs:
            if proc.poll() is None:
                log.warning("worker pid %d did not stop in time: killed", proc.pid)
                proc.kill()
                proc.wait()
            _forget(proc.pid)


def _forget(pid: int) -> None:
    """A dead worker's live gauges (in flight, queued...) no longer count."""
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
