"""What the gateway knows about each backend right now: fed by health polls and by real traffic."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from backends.base import Backend


@dataclass
class BackendState:
    backend: Backend
    healthy: bool | None = None  # None until the first health poll or request says otherwise
    last_error: str | None = None
    last_error_at: float | None = None
    last_latency_ms: float | None = None
    last_check_at: float | None = None
    requests: int = 0
    failures: int = 0
    _logged_error: str | None = field(default=None, repr=False)

    def should_log(self, message: str) -> bool:
        """One log line per distinct problem, not one per request: True only when `message` is new."""
        if message == self._logged_error:
            return False
        self._logged_error = message
        return True

    def record_success(self, latency_s: float) -> None:
        self.requests += 1
        self.healthy = True
        self._logged_error = None
        self.last_latency_ms = round(latency_s * 1000, 3)

    def record_failure(self, message: str, *, unhealthy: bool) -> None:
        self.requests += 1
        self.failures += 1
        self.last_error = message
        self.last_error_at = time.time()
        if unhealthy:
            self.healthy = False

    def record_health(self, ok: bool, detail: str, latency_s: float) -> None:
        self.healthy = ok
        self.last_check_at = time.time()
        if ok:
            self._logged_error = None
        self.last_latency_ms = round(latency_s * 1000, 3) if self.last_latency_ms is None else self.last_latency_ms
        if not ok:
            self.last_error = detail
            self.last_error_at = self.last_check_at
