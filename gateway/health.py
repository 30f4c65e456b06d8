"""Active health checks: one task per backend, never blocking start-up.

Each check calls the backend's health route **and** embeds one probe text: a server can say "ok" and
still fail to embed. Results move the backend between healthy and unhealthy (with thresholds), feed
its circuit breaker (a passing probe closes a half-open circuit) and its latency EWMA.

Slow is alive: the check's time bound is learned (a multiple of the backend's recent one-text call time,
at least `health_timeout_s`); a real embedding that succeeded since the last check proves more than the
probe would, so the probe is skipped then (it would only queue behind client work at the backend); and
a probe that times out while client calls are at the backend and it answered one of them lately means
busy, not broken (a backend that answers nothing is down however many calls wait on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from backends.errors import BackendError, BackendMisconfigured
from config.settings import ResilienceSettings
from gateway.calls import BackendCalls, Purpose
from gateway.metrics import Metrics
from gateway.resilience.breaker import CircuitState
from gateway.resilience.deadline import Deadline
from gateway.state import BackendState
from gateway.tasks import cancel_all

log = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(
        self,
        states: Sequence[BackendState],
        settings: ResilienceSettings,
        calls: BackendCalls,
        metrics: Metrics,
        supervisor_error: Callable[[str], str | None] = lambda _name: None,
        on_change: Callable[[BackendState, bool], None] = lambda _st, _healthy: None,
    ) -> None:
        self._states = states
        self._settings = settings
        self._calls = calls
        self._metrics = metrics
        self._supervisor_error = supervisor_error
        self._on_change = on_change
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop(st), name=f"health-{st.backend.name}") for st in self._states]

    async def stop(self) -> None:
        await cancel_all(self._tasks)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(st) for st in self._states))

    async def _loop(self, st: BackendState) -> None:
        s = self._settings
        while True:
            await self.check(st)
            # Check quickly while a backend is down or unknown, so one that comes back (a managed
            # server still loading, a restarted one) takes traffic within about a second.
            await asyncio.sleep(s.health_interval_s if st.healthy else min(s.health_interval_s, 0.5))

    async def check(self, st: BackendState) -> None:
        backend = st.backend
        breaker = st.breaker
        # An open circuit is left alone until its cool-down ends; then this check is its probe.
        probing = breaker.state is CircuitState.HALF_OPEN and breaker.allow()
        started = time.perf_counter()
        misconfigured = timed_out = False
        bound = self.bound_s(st)
        proven = time.monotonic() - st.alive_at < self._settings.health_interval_s and not probing
        try:
            async with asyncio.timeout(bound):
                health = await backend.health()
                ok, detail = health.ok, health.detail
                if ok and not proven:
                    await self._probe(st, bound)
        except BackendError as exc:
            ok, detail = False, exc.message
            misconfigured = isinstance(exc, BackendMisconfigured)
            st.last_check_error_kind = exc.kind
        except TimeoutError:
            # A probe that queued behind real traffic means busy, not broken: a real embedding just
            # succeeded, or client calls are still at the backend within their own (learned) bounds.
            timed_out = True
            since_success = time.monotonic() - st.alive_at
            ok = since_success < bound or (st.busy() and since_success < 4 * bound)
            st.last_check_error_kind = "timeout"
            detail = "" if ok else f"health check timed out after {bound:.1f}s"
        except Exception as exc:  # a bug in one adapter must not kill the monitor
            ok, detail = False, f"health check failed: {type(exc).__name__}"
            log.exception("health check of %s raised", backend.name)
        elapsed = time.perf_counter() - started
        if not ok and (sup := self._supervisor_error(backend.name)):
            detail = sup  # the supervisor knows why better than "connection refused" does
        self._calls.health_result(st, ok, probing, None if timed_out else elapsed, self._settings.healthy_threshold)
        changed = st.record_check(
            ok,
            detail,
            healthy_threshold=self._settings.healthy_threshold,
            unhealthy_threshold=self._settings.unhealthy_threshold,
        )
        self._metrics.backend_healthy.labels(backend.name, backend.model).set(1 if st.healthy else 0)
        if changed is True:
            log.info("backend %s is healthy", backend.name)
        elif not ok and st.should_log(detail):
            log.log(
                logging.ERROR if misconfigured else logging.WARNING, "backend %s is unhealthy: %s", backend.name, detail
            )
        if changed is True:
            await self._learn(st)  # a backend back from down may be another build: what it says now
        if changed is not None:
            self._on_change(st, changed)

    def bound_s(self, st: BackendState) -> float:
        """How long one check may take: `health_timeout_s`, or more for a backend that is slow lately."""
        return st.times.timeout_s(1, self._settings.health_timeout_s, self._calls.policy.capacity)

    async def _probe(self, st: BackendState, timeout: float) -> None:
        """Embed one text: proves the backend can embed, with the right dimension."""
        await self._calls.embed(
            st, [self._settings.probe_text], None, deadline=Deadline(timeout), purpose=Purpose.HEALTH, timeout_s=timeout
        )
        if st.info is None:
            await self._learn(st)

    @staticmethod
    async def _learn(st: BackendState) -> None:
        """What the backend says about itself (limits, slots): learned here only, the one writer of it."""
        with contextlib.suppress(BackendError, TimeoutError):
            async with asyncio.timeout(15.0):
                st.learn(await st.backend.describe())
