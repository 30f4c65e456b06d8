"""What the gateway knows about each backend right now: fed by health checks and by real traffic."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from backends.base import Backend, BackendInfo
from gateway.consistency.report import Verdict
from gateway.resilience.admission import Admission
from gateway.resilience.breaker import CircuitBreaker
from gateway.resilience.capacity import CallTimes, ConcurrencyLimit

_EWMA_ALPHA = 0.3
_RECENT = 256  # client calls whose latency the p50/p99 in /v1/backends are taken over
# Calls at once at a backend that states no limit and has none configured.
DEFAULT_CONCURRENCY = 16


@dataclass
class BackendState:
    backend: Backend
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    healthy: bool | None = None  # None until the first health check (or request) says otherwise
    info: BackendInfo | None = None  # what the backend says about itself (limits, pooling...)
    last_error: str | None = None
    last_error_at: float | None = None
    last_latency_ms: float | None = None
    latency_ewma_ms: float | None = None
    last_check_at: float | None = None
    last_success_at: float = -1e18  # time.monotonic() of the last real request it served
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    check_streak: int = 0  # consecutive health results of the same sign: +n passing, -n failing
    last_check_error_kind: str | None = None  # why the last failing health check failed (error class kind)
    agreement: Verdict = Verdict.PENDING  # the agreement checker's verdict against the reference
    agreement_detail: str | None = None
    # RESTRICTED: scripts it disagrees with the model on; requests with text in them never go there.
    excluded_scripts: frozenset[str] = frozenset()
    last_pass_at: float | None = None  # time.time() of its last passing agreement check (the cache trusts it)
    # Its vectors do not depend on batch composition (measured by the checker): it may take coalesced calls.
    batch_invariant: bool | None = None
    batch_cosine: float | None = None
    admission: Admission = field(default_factory=lambda: Admission(DEFAULT_CONCURRENCY))
    workers: int = 1  # processes sharing the backend (serve --workers N): each admits its share
    recent_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_RECENT), repr=False)  # client calls
    times: CallTimes = field(default_factory=CallTimes, repr=False)  # learned call time by size (timeouts, ETA)
    capacity: ConcurrencyLimit = field(init=False, repr=False)  # the adaptive admission limit
    last_failure_kind: str | None = None  # the error class of the last failed client call
    panicked: int = 0  # requests routed here by panic routing (every backend of its model was out)
    queued_units: int = 0  # work waiting in this process's queue for the backend (texts + 1 per call)
    in_flight_units: int = 0  # work at the backend now, from this process
    # Written by the control plane only, from workers' reports (monotonic clocks are system-wide):
    reported_success_at: float = -1e18  # a worker's last client call it served
    busy_until: float = -1e18  # monotonic time until which workers reported client calls at this backend
    _logged_error: str | None = field(default=None, repr=False)

    def should_log(self, message: str) -> bool:
        """One log line per distinct problem, not one per request: True only when `message` is new."""
        if message == self._logged_error:
            return False
        self._logged_error = message
        return True

    @property
    def shadow(self) -> bool:
        """A shadow backend is compared with live traffic and never serves a client."""
        return bool(getattr(getattr(self.backend, "config", None), "shadow", False))

    def __post_init__(self) -> None:
        self.capacity = ConcurrencyLimit(self.admission.set_limit)
        self.capacity.reset(self.concurrency_limit())

    def learn(self, info: BackendInfo | None) -> None:
        """What the backend says about itself (None: forget it); its stated slots bound its admission."""
        self.info = info
        self.capacity.reset(self.concurrency_limit())

    def concurrency_limit(self) -> int:
        """Calls at once from this process: the configured `max_concurrency`, else what the backend
        states, else a default; shared out among the workers (rounded up: a backend never idles)."""
        configured = getattr(getattr(self.backend, "config", None), "max_concurrency", None)
        learned = self.info.max_concurrency if self.info else None
        total = int(configured or learned or DEFAULT_CONCURRENCY)
        return max(1, -(-total // self.workers))

    @property
    def unreachable(self) -> bool:
        """Down for connection or time reasons (not for what it answers): not worth waiting on."""
        return self.healthy is False and self.last_check_error_kind in ("unavailable", "timeout", "misconfigured")

    def input_limit(self) -> int | None:
        """Most tokens per input the backend declared it takes (TEI's max_input_length, llama.cpp's context
        per slot...); None when it did not say."""
        return self.info.max_input_tokens if self.info is not None else None

    def batch_limit(self) -> int | None:
        """Most texts per call: the configured `max_batch_size` or what the backend reported, lower wins."""
        configured = getattr(getattr(self.backend, "config", None), "max_batch_size", None)
        learned = self.info.max_batch_size if self.info else None
        limits = [x for x in (configured, learned) if x]
        return min(limits) if limits else None

    def recent_percentiles(self) -> tuple[float | None, float | None]:
        """p50 and p99 of the last calls' latency (ms), for the views: computed when asked, not per call."""
        if not self.recent_ms:
            return None, None
        ordered = sorted(self.recent_ms)
        last = len(ordered) - 1
        return round(ordered[last // 2], 3), round(ordered[min(last, round(last * 0.99))], 3)

    def observe_latency(self, seconds: float) -> None:
        ms = seconds * 1000
        self.last_latency_ms = round(ms, 3)
        prev = self.latency_ewma_ms
        self.latency_ewma_ms = round(ms if prev is None else _EWMA_ALPHA * ms + (1 - _EWMA_ALPHA) * prev, 3)

    @property
    def alive_at(self) -> float:
        """Monotonic time of the last client call it served, here or in any worker."""
        return max(self.last_success_at, self.reported_success_at)

    def busy(self) -> bool:
        """Client calls are at the backend now (this process's, or a worker's lately)."""
        return self.in_flight > 0 or time.monotonic() < self.busy_until

    def record_success(self, latency_s: float) -> None:
        self.requests += 1
        self.last_success_at = time.monotonic()
        self.observe_latency(latency_s)
        self.recent_ms.append(latency_s * 1000)
        if self.healthy is None:
            self.healthy = True
        self._logged_error = None

    def record_failure(self, message: str) -> None:
        self.requests += 1
        self.failures += 1
        self.last_error = message
        self.last_error_at = time.time()

    def record_check(self, ok: bool, detail: str, *, healthy_threshold: int, unhealthy_threshold: int) -> bool | None:
        """Apply one health-check result; returns the new `healthy` when it changed, else None."""
        self.last_check_at = time.time()
        self.check_streak = max(1, self.check_streak + 1) if ok else min(-1, self.check_streak - 1)
        if not ok:
            self.last_error, self.last_error_at = detail, self.last_check_at
        before = self.healthy
        if before is None:  # the first verdict is decisive: start-up must not wait for thresholds
            self.healthy = ok
        elif ok and not before and self.check_streak >= healthy_threshold:
            self.healthy = True
        elif not ok and before and -self.check_streak >= unhealthy_threshold:
            self.healthy = False
        if self.healthy:
            self._logged_error = None
        return self.healthy if self.healthy is not before else None
