"""Choosing the backend for the next attempt.

Priority first (lower is tried first). Among equal priorities: the lowest latency EWMA times
(in-flight + queued + 1) — "peak EWMA" as Finagle and Envoy's least-request balancer do it. We chose
it over weighted round-robin because the backends of one model are often very unequal (TEI on a GPU
next to TEI on CPUs): static weights need hand-tuning and go stale, while latency x load adapts by
itself, sends most traffic to the fast backend and spills to the slower one exactly when the fast one
queues.

Overflow: priority is a preference, not a wall. When the preferred backend's slots are all busy and
waiting in its queue would take longer than another backend would need for the whole call, the call
goes to that other backend (counted as overflow) instead of queueing behind a slow primary.

Panic routing (Envoy's panic threshold): when no backend of the model is usable - all unhealthy or with
open circuits - but some of them are out only because they answered *too slowly* (timeouts, not refused
connections or errors), they are used anyway, the faster ones more often: a slow answer beats refusing
every request of a saturated model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from gateway.state import BackendState

_SLOW_KINDS = frozenset({"timeout"})  # failures that mean "too slow", not "gone" or "wrong"


def score(st: BackendState) -> float:
    # Unknown latency scores 0: a fresh backend gets traffic and so a measurement.
    return (st.latency_ewma_ms or 0.0) * (st.in_flight + st.admission.queued + 1)


def eta_s(st: BackendState, usual_s: float) -> float:
    """Expected seconds until a new call to `st` would be answered: queueing, then the call itself."""
    call = (st.latency_ewma_ms / 1000) if st.latency_ewma_ms is not None else usual_s
    return st.admission.expected_wait_s(call) + call


def queue_eta_s(st: BackendState, units: int, largest: int) -> tuple[float, float] | None:
    """(seconds until the work queued and in flight at `st` is done, seconds until a request of `units` more
    work, whose largest call has `largest` texts, would be answered too): the work ahead shared over the
    backend's `limit` slots at what such calls take it unloaded (the adaptive limit keeps it near that: a
    slower answer lowers the limit). None when a slot is free with nobody queued, or nothing is known yet
    (nothing to wait for, or nothing to go by)."""
    if not st.admission.saturated and not st.admission.queued:
        return None
    call = st.times.unloaded_s(largest)
    if call is None:
        return None
    per_unit = call / (largest + 1)
    ahead = (st.queued_units + st.in_flight_units) * per_unit / st.admission.limit
    return ahead, ahead + max(call, units * per_unit / st.admission.limit)


def slow_not_dead(st: BackendState) -> bool:
    """Out of service only for answering too slowly: what panic routing may still use."""
    kinds = {st.last_failure_kind, st.last_check_error_kind} - {None}
    return bool(kinds) and kinds <= _SLOW_KINDS


class AttemptPlan:
    """The candidates for one sub-batch, and which of them this sub-batch has already tried."""

    def __init__(self, members: Sequence[BackendState], retry_after_cap_s: float = 60.0) -> None:
        self.members = list(members)
        self.tried: set[str] = set()
        self.overflowed_from: str | None = None
        self.panicked = False  # the last `take` used panic routing
        self._retry_after_cap_s = retry_after_cap_s

    def usable(self) -> list[BackendState]:
        open_ok = [st for st in self.members if st.breaker.available()]
        healthy = [st for st in open_ok if st.healthy is not False]
        # Failing health skips a backend without waiting for a timeout; if every backend is failing
        # its health check but some circuit still admits calls, trying beats refusing outright.
        return healthy or open_ok

    def has_untried(self) -> bool:
        return any(st.backend.name not in self.tried for st in self.usable())

    def take(self, *, untried_only: bool = False) -> BackendState | None:
        """The best usable backend (untried first), with its circuit's permission taken; None if none.
        With no circuit admitting a call, a backend that is out only for being slow (panic routing)."""
        self.overflowed_from = None
        self.panicked = False
        usable = self.usable()
        if not usable:
            return self._panic(untried_only)
        if untried_only:
            usable = [st for st in usable if st.backend.name not in self.tried]
        usable.sort(key=lambda st: (st.backend.name in self.tried, st.backend.priority, score(st)))
        if len(usable) > 1 and usable[0].admission.saturated:
            usable = self._overflow(usable)
        for st in usable:
            if st.breaker.allow():
                self.tried.add(st.backend.name)
                return st
        return None

    def _panic(self, untried_only: bool) -> BackendState | None:
        """Every member is out: use one that is out only for being slow, weighted by 1 / latency."""
        slow = [st for st in self.members if slow_not_dead(st)]
        untried = [st for st in slow if st.backend.name not in self.tried]
        pool = untried if untried or untried_only else slow
        if not pool:
            return None
        weights = [1.0 / max(1.0, st.latency_ewma_ms or 1.0) for st in pool]
        st = random.choices(pool, weights)[0]
        self.tried.add(st.backend.name)
        self.panicked = True
        return st

    def _overflow(self, ranked: list[BackendState]) -> list[BackendState]:
        """Put first the backend that would answer soonest, when that is not the (saturated) preferred one."""
        first = ranked[0]
        known = [st.latency_ewma_ms / 1000 for st in ranked if st.latency_ewma_ms is not None]
        usual = sum(known) / len(known) if known else 0.0
        fresh = [st for st in ranked[1:] if st.backend.name not in self.tried or first.backend.name in self.tried]
        if not fresh:
            return ranked
        best = min(fresh, key=lambda st: eta_s(st, usual))
        if eta_s(best, usual) < eta_s(first, usual):
            self.overflowed_from = first.backend.name
            return [best, *(st for st in ranked if st is not best)]
        return ranked

    def retry_after(self) -> float:
        """Seconds until the first circuit may close: at least 1, and never past the next health check
        (a passing check ends a cool-down early), unless the backend itself asked for longer."""
        waits = [
            max(st.breaker.held_s(), min(st.breaker.remaining_open_s(), self._retry_after_cap_s)) for st in self.members
        ]
        return max(1.0, min(waits)) if waits else 1.0
