"""The control plane's side of the control channel (the parent process of `serve --workers N`).

It holds the one runtime that runs health checks, agreement checks and managed servers, turns its
state into a routing snapshot, and pushes every changed snapshot to every worker (checked every
`_PUBLISH_EVERY_S`, so a backend that fails a check leaves every worker's routing well within one
check interval). It answers the workers' requests: a rescue check, a check now, the shared views.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from gateway.control import channel
from gateway.control.snapshot import Snapshot, build
from gateway.resilience.deadline import Deadline
from gateway.runtime import Runtime
from gateway.tasks import cancel_all
from gateway.views import backends_view, check_view, consistency_view

log = logging.getLogger(__name__)

_PUBLISH_EVERY_S = 0.05
_STUCK_BYTES = 4 * 1024 * 1024  # a worker this far behind on snapshots is not reading: drop it


class Holder(Protocol):
    runtime: Runtime  # the current one: a reload swaps it


@dataclass
class _Worker:
    id: int
    pid: int
    writer: asyncio.StreamWriter
    serving: bool = False
    backends: dict[str, Any] = field(default_factory=dict)
    quotas: dict[str, list[int]] = field(default_factory=dict)  # "key/what" -> [window, shared remaining]


class ControlPlane:
    def __init__(self, holder: Holder, path: Path, workers: int) -> None:
        self._holder = holder
        self.path = path
        self.workers = workers
        self._seq = 0
        self._content: Snapshot | None = None  # the last snapshot's content, without its number
        self._published: Snapshot | None = None
        self._followers: dict[asyncio.StreamWriter, _Worker] = {}
        self._server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def runtime(self) -> Runtime:
        return self._holder.runtime

    def current(self) -> Snapshot:
        """The latest snapshot; a new number only when something changed."""
        content = build(self.runtime, self.workers, self._pooled_quotas())
        if content != self._content or self._published is None:
            self._content = content
            self._seq += 1
            self._published = msgspec.structs.replace(content, seq=self._seq)
        return self._published

    def _pooled_quotas(self) -> dict[str, list[int]]:
        """The smallest shared remaining any worker saw, per key and the latest window: what a worker's
        quota fallback may share out if Redis goes away."""
        pooled: dict[str, list[int]] = {}
        for worker in self._followers.values():
            for name, (window, remaining) in worker.quotas.items():
                have = pooled.get(name)
                if have is None or window > have[0] or (window == have[0] and remaining < have[1]):
                    pooled[name] = [window, remaining]
        return pooled

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=channel.LIMIT)
        os.chmod(self.path, 0o600)  # only this user's processes may ask for checks
        self._tasks = [asyncio.create_task(self._publish(), name="publish-snapshots")]

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        if self._server is not None:
            self._server.close()
        for writer in list(self._followers):
            writer.close()
        self.path.unlink(missing_ok=True)

    def processes(self) -> list[dict[str, Any]]:
        return [{"id": w.id, "pid": w.pid, "backends": w.backends} for w in self._followers.values()]

    def serving(self, pid: int) -> bool:
        """The worker with this pid is connected and accepting requests."""
        return any(w.pid == pid and w.serving for w in self._followers.values())

    async def _publish(self) -> None:
        while True:
            before = self._published
            snapshot = self.current()
            if snapshot is not before:
                line = channel.encode(snapshot)
                for writer in list(self._followers):
                    if writer.transport.get_write_buffer_size() > _STUCK_BYTES:
                        pid = self._followers[writer].pid
                        log.error("worker pid %d does not read its snapshots: disconnected", pid)
                        writer.close()
                    else:
                        writer.write(line)
            await asyncio.sleep(_PUBLISH_EVERY_S)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await channel.read(reader)
            if first is None:
                return
            if first.get("op") == "hello":
                await self._follow(first, reader, writer)
            else:
                writer.write(channel.encode(await self._answer(first)))
                await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            log.debug("control channel: %s", exc)
        except Exception:
            log.exception("control channel request failed")
        finally:
            writer.close()

    async def _follow(self, hello: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        worker = _Worker(int(hello["worker"]), int(hello["pid"]), writer)
        writer.write(channel.encode(self.current()))
        self._followers[writer] = worker
        try:
            while (message := await channel.read(reader)) is not None:
                if message.get("op") == "stats":
                    worker.serving = bool(message["serving"])
                    worker.backends = message["backends"]
                    worker.quotas = message.get("quotas") or {}
                    self._note_traffic(worker.backends)
        finally:
            self._followers.pop(writer, None)

    def _note_traffic(self, figures: dict[str, Any]) -> None:
        """A worker's recent success proves a busy backend alive: a health probe that times out behind
        that traffic then means busy, not broken (monotonic clocks are system-wide)."""
        for st in self.runtime.states:
            f = figures.get(st.backend.name)
            if f is None:
                continue
            if f["last_success_at"] > st.reported_success_at:
                st.reported_success_at = min(f["last_success_at"], time.monotonic())
            if f["in_flight"]:  # calls at the backend: a probe stuck behind them means busy
                st.busy_until = time.monotonic() + 2.5  # until the worker's next report (each second) and then some

    async def _answer(self, message: dict[str, Any]) -> dict[str, Any]:
        rt = self.runtime
        op = message.get("op")
        if op == "view":
            return backends_view(rt, self.processes(), self.workers)
        if op == "reports":
            return consistency_view(rt)
        if op == "check":
            body = await check_view(rt, message.get("model"))
            return {**body, "snapshot": self.current()}
        if op == "audit":
            assert rt.consistency is not None
            rt.consistency.audit_failed(
                str(message["model"]),
                str(message["backend"]),
                float(message["cosine"]),
                str(message["text"]),
                str(message["compared_with"]),
            )
            return {"snapshot": self.current()}
        if op == "traffic":
            assert rt.consistency is not None
            rt.consistency.observe_traffic(str(message["model"]), [str(t) for t in message["texts"]])
            return {}
        if op == "rescue":
            assert rt.consistency is not None
            with contextlib.suppress(Exception):
                await rt.consistency.rescue(str(message["model"]), Deadline(float(message["timeout_s"])))
            return {"snapshot": self.current()}
        return {"error": f"unknown operation {op!r}"}
