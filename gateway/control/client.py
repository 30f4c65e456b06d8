"""A worker's side of the control channel: follow the snapshots, report traffic, ask for checks.

The worker keeps one connection open: the control plane pushes each new snapshot down it, and the
worker sends its traffic figures up it every second (the shared `/v1/backends` view, and "a real
embedding just succeeded" for health checks that time out under load). Requests (a rescue check,
`POST /v1/consistency`, the shared view) each use a connection of their own.

When the control plane goes away (the parent died) the worker shuts down gracefully: serving on
without health and agreement checks would be serving blind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.consistency.service import ConsistencyService
from gateway.control import channel
from gateway.control.snapshot import Snapshot, apply, decode
from gateway.errors import NoBackendAvailable
from gateway.resilience.deadline import Deadline
from gateway.tasks import cancel_all

if TYPE_CHECKING:
    from litestar import Litestar

    from gateway.runtime import Runtime

log = logging.getLogger(__name__)

_CONNECT_S = 30.0
_REPORT_EVERY_S = 1.0


class ControlPlaneUnavailable(NoBackendAvailable):
    """The control plane did not answer (restarting, overloaded): 503 + Retry-After."""

    code = "control_plane_unavailable"


class PlaneClient:
    def __init__(self, path: Path, worker_id: int) -> None:
        self.path = path
        self.worker_id = worker_id
        self.snapshot: Snapshot | None = None
        self.serving: Callable[[], bool] = lambda: False  # set by the worker: uvicorn has started accepting
        self._runtime: Runtime | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @asynccontextmanager
    async def lifespan(self, _app: Litestar) -> AsyncIterator[None]:
        await self.connect()
        try:
            yield
        finally:
            await self.close()

    async def connect(self) -> None:
        """Say hello and take the first snapshot: a worker never serves before it has one."""
        loop = asyncio.get_running_loop()
        end = loop.time() + _CONNECT_S
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path), limit=channel.LIMIT)
                break
            except OSError:
                if loop.time() >= end:
                    raise
                await asyncio.sleep(0.1)
        writer.write(channel.encode({"op": "hello", "worker": self.worker_id, "pid": os.getpid()}))
        first = await channel.read(reader)
        if first is None:
            raise ConnectionError("the control plane closed the connection before its first snapshot")
        self.snapshot = decode(first)
        self._writer = writer
        self._tasks = [
            asyncio.create_task(self._follow(reader), name="follow-snapshots"),
            asyncio.create_task(self._report(writer), name="report-traffic"),
        ]

    async def close(self) -> None:
        await cancel_all(self._tasks)
        if self._writer is not None:
            self._writer.close()

    def managed_url(self, name: str) -> str | None:
        assert self.snapshot is not None
        entry = self.snapshot.backends.get(name)
        return entry.url if entry else None

    def attach(self, rt: Runtime) -> None:
        self._runtime = rt
        if isinstance(rt.consistency, FollowerConsistency):
            rt.consistency.plane = self
        if self.snapshot is not None:
            self.take(self.snapshot)

    def take(self, snapshot: Snapshot) -> None:
        """Swap in a snapshot (pushed, or returned with an answer); an older one never replaces a newer."""
        current = self.snapshot
        if current is not None and snapshot.seq < current.seq:
            return
        self.snapshot = snapshot
        rt = self._runtime
        if rt is not None:
            apply(snapshot, rt)
            if isinstance(rt.consistency, FollowerConsistency):
                rt.consistency.follow(snapshot)

    async def _follow(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await channel.read(reader)) is not None:
                self.take(decode(message))
        except (OSError, ValueError) as exc:
            log.error("control channel broken: %s", exc)
        log.error("the control plane is gone (its process ended): this worker shuts down")
        os.kill(os.getpid(), signal.SIGTERM)

    async def _report(self, writer: asyncio.StreamWriter) -> None:
        from gateway.views import worker_figures

        while True:
            serving = self.serving()
            rt = self._runtime
            if rt is not None:
                rt.refresh_gauges()  # the multiprocess gauges of this worker stay current between scrapes
                figures = worker_figures(rt)
                quotas = rt.quotas.observations()
                message = {"op": "stats", "serving": serving, "backends": figures, "quotas": quotas}
                writer.write(channel.encode(message))
                with contextlib.suppress(OSError):
                    await writer.drain()
            # Quickly until uvicorn accepts (a rolling restart waits for that), then once a second.
            await asyncio.sleep(_REPORT_EVERY_S if serving else 0.05)

    async def request(self, message: dict[str, Any], timeout_s: float | None = 30.0) -> dict[str, Any]:
        """Ask the control plane; its answer (a snapshot included is applied first)."""
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_unix_connection(str(self.path), limit=channel.LIMIT)
                try:
                    writer.write(channel.encode(message))
                    answer = await channel.read(reader)
                finally:
                    writer.close()
        except (OSError, TimeoutError, ValueError) as exc:
            raise ControlPlaneUnavailable(
                f"the gateway's control plane did not answer ({type(exc).__name__}); retry"
            ) from None
        if answer is None:
            raise ControlPlaneUnavailable("the gateway's control plane closed the connection; retry")
        if (snapshot := answer.pop("snapshot", None)) is not None:
            self.take(decode(snapshot))
        return answer


class FollowerConsistency(ConsistencyService):
    """A worker's consistency service: verdicts come from the control plane's snapshots; nothing is
    checked here. A rescue asks the control plane to check now, within the request's deadline."""

    plane: PlaneClient | None = None

    def start(self) -> None:
        pass  # the control plane runs the checks

    async def stop(self) -> None:
        pass

    def backend_recovered(self, st: Any, healthy: bool) -> None:
        pass

    def follow(self, snapshot: Snapshot) -> None:
        for model, m in snapshot.models.items():
            if model not in self._bootstrapped:
                continue
            if m.bootstrapped:
                self._bootstrapped[model].set()
            if m.space_id is not None:
                self._live_ids[model] = m.space_id
            _set(self.drifted, model, m.drifted)
            _set(self.errors, model, m.error)

    def audit_failed(self, model: str, backend: str, cosine: float, text: str, compared_with: str) -> None:
        """The control plane quarantines (one writer of verdicts); the text goes over the local socket only."""
        self._forward(
            {
                "op": "audit",
                "model": model,
                "backend": backend,
                "cosine": cosine,
                "text": text,
                "compared_with": compared_with,
            }
        )

    def observe_traffic(self, model: str, texts: list[str]) -> None:
        self._forward({"op": "traffic", "model": model, "texts": texts[:8]})

    def _forward(self, message: dict[str, Any]) -> None:
        if self.plane is None:
            return
        forwarded: set[asyncio.Task[dict[str, Any]]] = self.__dict__.setdefault("_forwarded", set())
        task = asyncio.ensure_future(self.plane.request(message, timeout_s=10))
        forwarded.add(task)  # fire and forget, but referenced until done
        task.add_done_callback(forwarded.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a lost one is not worth a traceback

    async def rescue(self, model: str, deadline: Deadline) -> bool:
        if self.plane is None or not self.settings.enabled:
            return False
        group = self._by_model.get(model, [])
        before = {st.backend.name for st in self.members(model, group)}
        started = time.monotonic()
        with contextlib.suppress(ControlPlaneUnavailable):
            await self.plane.request(
                {"op": "rescue", "model": model, "timeout_s": deadline.remaining()}, timeout_s=deadline.remaining()
            )
        log.debug("model %s: rescue asked of the control plane (%.0f ms)", model, (time.monotonic() - started) * 1e3)
        return bool({st.backend.name for st in self.members(model, group)} - before)


def _set(d: dict[str, str], key: str, value: str | None) -> None:
    if value is None:
        d.pop(key, None)
    else:
        d[key] = value
