"""A per-backend circuit breaker: closed -> open -> half-open -> closed.

Opens on N consecutive failures, or on a failure ratio over a sliding window (with a minimum number
of calls, so two failures out of three never trip it). Stays open for a cool-down that doubles on
repeated trips (capped); a trip may be held open longer when the backend asked for it (Retry-After).
Half-open lets exactly one probe through; its outcome closes or re-opens the circuit.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    consecutive_failures: int = 5
    failure_ratio: float = 0.5
    window_s: float = 30.0
    min_calls: int = 10
    cooldown_s: float = 2.0
    cooldown_max_s: float = 60.0
    cooldown_multiplier: float = 2.0


class CircuitBreaker:
    def __init__(
        self,
        policy: BreakerPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_trip: Callable[[], None] = lambda: None,
    ) -> None:
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self._on_trip = on_trip
        self._state = CircuitState.CLOSED
        self._open_until = 0.0
        self._hold_until = 0.0
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()
        self._trip_streak = 0
        self._last_trip = -1e18
        self._probe_in_flight = False
        self.trips = 0

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self._clock() >= self._open_until:
            self._state = CircuitState.HALF_OPEN
            self._probe_in_flight = False
        return self._state

    def remaining_open_s(self) -> float:
        return max(0.0, self._open_until - self._clock()) if self.state is CircuitState.OPEN else 0.0

    def held_s(self) -> float:
        """Seconds left of a Retry-After the backend itself asked for (0 when none)."""
        return max(0.0, self._hold_until - self._clock()) if self.state is CircuitState.OPEN else 0.0

    def available(self) -> bool:
        """Could a call go through now? (No side effect: use `allow()` to actually take the slot.)"""
        state = self.state
        return state is CircuitState.CLOSED or (state is CircuitState.HALF_OPEN and not self._probe_in_flight)

    def allow(self) -> bool:
        """Take permission for one call. In half-open, only the first caller gets it (the probe)."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def end_cooldown(self) -> None:
        """Evidence that the backend is back (active health checks pass): go half-open now, not later."""
        if self._state is CircuitState.OPEN:
            # ...but never before a Retry-After the backend itself asked for.
            self._open_until = max(self._clock(), self._hold_until)

    def release(self) -> None:
        """A permitted call ended without a verdict (e.g. cancelled): free the half-open probe slot."""
        self._probe_in_flight = False

    def record_success(self) -> None:
        if self.state is CircuitState.HALF_OPEN:
            self._close()
            return
        self._consecutive = 0
        self._remember(ok=True)

    def record_failure(self, *, hold_open_s: float | None = None) -> None:
        state = self.state
        if state is CircuitState.OPEN:
            return
        if state is CircuitState.HALF_OPEN:
            self.trip(hold_open_s)
            return
        self._consecutive += 1
        self._remember(ok=False)
        p = self.policy
        failures = sum(1 for _, ok in self._window if not ok)
        ratio_hit = len(self._window) >= p.min_calls and failures / len(self._window) >= p.failure_ratio
        if self._consecutive >= p.consecutive_failures or ratio_hit or hold_open_s:
            self.trip(hold_open_s)

    def trip(self, hold_open_s: float | None = None) -> None:
        now = self._clock()
        p = self.policy
        # A trip soon after the last one is part of the same flapping episode: back off harder.
        self._trip_streak = self._trip_streak + 1 if now - self._last_trip < p.cooldown_max_s * 2 else 1
        cooldown = min(p.cooldown_s * p.cooldown_multiplier ** (self._trip_streak - 1), p.cooldown_max_s)
        self._open_until = now + max(cooldown, hold_open_s or 0.0)
        self._hold_until = now + (hold_open_s or 0.0)
        self._state = CircuitState.OPEN
        self._last_trip = now
        self._probe_in_flight = False
        self._consecutive = 0
        self._window.clear()
        self.trips += 1
        self._on_trip()

    def _close(self) -> None:
        self._state = CircuitState.CLOSED
        self._probe_in_flight = False
        self._consecutive = 0
        self._window.clear()

    def _remember(self, *, ok: bool) -> None:
        now = self._clock()
        self._window.append((now, ok))
        horizon = now - self.policy.window_s
        while self._window and self._window[0][0] < horizon:
            self._window.popleft()
