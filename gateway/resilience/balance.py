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
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.state import BackendState


def score(st: BackendState) -> float:
    # Unknown latency scores 0: a fresh backend gets traffic and so a measurement.
    return (st.latency_ewma_ms or 0.0) * (st.in_flight + st.admission.queued + 1)


def eta_s(st: BackendState, usual_s: float) -> float:
    """Expected seconds until a new call to `st` would be answered: queueing, then the call itself."""
    call = (st.latency_ewma_ms / 1000) if st.latency_ewma_ms is not None else usual_s
    return st.admission.expected_wait_s(call) + call


class AttemptPlan:
    """The candidates for one sub-batch, and which of them this sub-batch has already tried."""

    def __init__(self, members: Sequence[BackendState], retry_after_cap_s: float = 60.0) -> None:
        self.members = list(members)
        self.tried: set[str] = set()
        self.overflowed_from: str | None = None
        self._retry_after_cap_s = retry_after_cap_s

    def _usable(self) -> list[BackendState]:
        open_ok = [st for st in self.members if st.breaker.available()]
        healthy = [st for st in open_ok if st.healthy is not False]
        # Failing health skips a backend without waiting for a timeout; if every backend is failing
        # its health check but some circuit still admits calls, trying beats refusing outright.
        return healthy or open_ok

    def has_untried(self) -> bool:
        return any(st.backend.name not in self.tried for st in self._usable())

    def take(self, *, untried_only: bool = False) -> BackendState | None:
        """The best usable backend (untried first), with its circuit's permission taken; None if none."""
        usable = self._usable()
        if untried_only:
            usable = [st for st in usable if st.backend.name not in self.tried]
        usable.sort(key=lambda st: (st.backend.name in self.tried, st.backend.priority, score(st)))
        self.overflowed_from = None
        if len(usable) > 1 and usable[0].admission.saturated:
            usable = self._overflow(usable)
        for st in usable:
            if st.breaker.allow():
                self.tried.add(st.backend.name)
                return st
        return None

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
