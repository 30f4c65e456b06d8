"""Background health polling: one loop, every backend checked concurrently, never blocking start-up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from backends.errors import BackendError, BackendMisconfigured
from gateway.metrics import Metrics
from gateway.state import BackendState

log = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(
        self,
        states: Sequence[BackendState],
        interval_s: float,
        metrics: Metrics,
        supervisor_error: Callable[[str], str | None] = lambda _name: None,
    ) -> None:
        self._states = states
        self._interval = interval_s
        self._metrics = metrics
        self._supervisor_error = supervisor_error
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="health-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(st) for st in self._states))

    async def _loop(self) -> None:
        while True:
            await self.check_all()
            # Poll quickly while something is down or unknown, so a backend that comes up (a managed
            # server still loading, a restarted one) takes traffic within a second.
            settled = all(st.healthy for st in self._states)
            await asyncio.sleep(self._interval if settled else min(self._interval, 0.5))

    async def _check(self, st: BackendState) -> None:
        backend = st.backend
        started = time.perf_counter()
        was = st.healthy
        misconfigured = False
        try:
            h = await asyncio.wait_for(backend.health(), timeout=max(1.0, self._interval))
            ok, detail = h.ok, h.detail
        except BackendError as exc:
            ok, detail = False, exc.message
            misconfigured = isinstance(exc, BackendMisconfigured)
        except TimeoutError:
            ok, detail = False, "health check timed out"
        if not ok and (sup := self._supervisor_error(backend.name)):
            detail = sup  # the supervisor knows why better than "connection refused" does
        st.record_health(ok, detail, time.perf_counter() - started)
        self._metrics.backend_healthy.labels(backend.name, backend.model).set(1 if ok else 0)
        if ok and was is not True:
            log.info("backend %s is healthy", backend.name)
        elif not ok and st.should_log(detail):
            level = logging.ERROR if misconfigured else logging.WARNING
            log.log(level, "backend %s is unhealthy: %s", backend.name, detail)
