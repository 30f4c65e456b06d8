"""Choosing the backend for the next attempt.

Priority first (lower is tried first). Among equal priorities: the lowest latency EWMA times
(in-flight + 1) — "peak EWMA" as Finagle and Envoy's least-request balancer do it. We chose it over
weighted round-robin because the backends of one model are often very unequal (TEI on a GPU next to
TEI on CPUs): static weights need hand-tuning and go stale, while latency x load adapts by itself,
sends most traffic to the fast backend and spills to the slower one exactly when the fast one queues.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.state import BackendState


def score(st: BackendState) -> float:
    # Unknown latency scores 0: a fresh backend gets traffic and so a measurement.
    return (st.latency_ewma_ms or 0.0) * (st.in_flight + 1)


class AttemptPlan:
    """The candidates for one sub-batch, and which of them this sub-batch has already tried."""

    def __init__(self, members: Sequence[BackendState]) -> None:
        self.members = list(members)
        self.tried: set[str] = set()

    def _usable(self) -> list[BackendState]:
        open_ok = [st for st in self.members if st.breaker.available()]
        healthy = [st for st in open_ok if st.healthy is not False]
        # Failing health skips a backend without waiting for a timeout; if every backend is failing
        # its health check but some circuit still admits calls, trying beats refusing outright.
        return healthy or open_ok

    def has_untried(self) -> bool:
        return any(st.backend.name not in self.tried for st in self._usable())

    def take(self) -> BackendState | None:
        """The best usable backend (untried first), with its circuit's permission taken; None if none."""
        usable = self._usable()
        usable.sort(key=lambda st: (st.backend.name in self.tried, st.backend.priority, score(st)))
        for st in usable:
            if st.breaker.allow():
                self.tried.add(st.backend.name)
                return st
        return None

    def retry_after(self) -> float:
        """Seconds until the first circuit reopens (at least 1): the client's Retry-After."""
        waits = [st.breaker.remaining_open_s() for st in self.members]
        return max(1.0, min(waits)) if waits else 1.0
