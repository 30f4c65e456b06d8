"""The one guarded call path to a backend: every embedding call - client traffic, health probes and
agreement checks - goes through `BackendCalls.embed`.

It owns, in one place: the circuit breaker's permission, admission (a bounded number of calls at the
backend, the rest queued here), in-flight counting, the call's timeout *versus the request's
deadline*, output checks, error classification, and the bookkeeping (breaker, latency EWMA, metrics).

The rule it enforces everywhere: time that ran out because of the *request's* deadline (or a client
that went away) never counts against a backend. Only a call that used its own full timeout, or failed
on its own, is a backend failure. And no call starts with less time left than it could use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from backends.base import Embeddings
from backends.errors import (
    BackendError,
    BackendMisconfigured,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    BadBackendOutput,
    InputRejected,
    PayloadTooLarge,
)
from gateway.coalesce import Coalescing, MergeHint
from gateway.errors import DeadlineExceeded
from gateway.metrics import Metrics
from gateway.resilience.breaker import CircuitState
from gateway.resilience.capacity import CapacityPolicy
from gateway.resilience.deadline import Deadline
from gateway.state import BackendState

log = logging.getLogger(__name__)


class Purpose(StrEnum):
    REQUEST = "request"  # client traffic: admission, breaker, latency, metrics
    CHECK = "check"  # agreement checks: admission (they share the backend's slots), nothing recorded
    HEALTH = "health"  # health probes: bypass the queue (they measure the backend, not our queue)


@dataclass(frozen=True, slots=True)
class CallPolicy:
    min_attempt_s: float = 0.01  # never start a call with less time left than this...
    min_attempt_share: float = 0.5  # ...or than this share of the backend's usual call time
    capacity: CapacityPolicy = field(default_factory=CapacityPolicy)


class Waiters:
    """Whether anyone still waits for a call: one that times out after everybody left is abandoned work,
    not a backend failure."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = False


def check_output(backend: str, out: Embeddings, n: int, dimension: int) -> None:
    """A wrong count, wrong dimension, non-finite or zero vector is a backend failure, never client data."""
    v = out.vectors
    if v.ndim != 2 or v.shape[0] != n:
        raise BadBackendOutput(backend, f"returned {v.shape[0] if v.ndim else 0} vectors for {n} inputs")
    if v.shape[1] != dimension:
        raise BadBackendOutput(backend, f"returned dimension {v.shape[1]}, the model profile says {dimension}")
    if not np.isfinite(v).all():
        raise BadBackendOutput(backend, "returned non-finite numbers (NaN or infinity)")
    if n and not np.any(v, axis=1).all():
        raise BadBackendOutput(backend, "returned an all-zero vector")


def classify(backend: str, exc: Exception) -> BackendError:
    if isinstance(exc, BackendError):
        return exc
    # An adapter bug must cost one backend attempt, not the client's request.
    log.exception("backend %s raised an unexpected error", backend, exc_info=exc)
    return BackendUnavailable(backend, f"unexpected error: {type(exc).__name__}")


def _settle(task: asyncio.Future[Embeddings], st: BackendState) -> None:
    """A call ended (answered, failed or shut down): free its slot; nobody may be left to read the error."""
    st.admission.release()
    if not task.cancelled():
        task.exception()


class BackendCalls:
    def __init__(self, dimensions: dict[str, int], metrics: Metrics, policy: CallPolicy | None = None) -> None:
        self._dimensions = dimensions
        self._metrics = metrics
        self.policy = policy or CallPolicy()
        self.coalescing = Coalescing(self, metrics)

    def call_timeout(self, st: BackendState, n: int) -> float:
        """The backend's own time for `n` texts: a multiple of what such calls take it lately (slow is
        alive), at least its configured `timeout_s` plus `timeout_per_text_s` per text."""
        config = getattr(st.backend, "config", None)
        floor = float(config.call_timeout_s(n)) if config is not None else 5.0 + 0.05 * n
        return st.times.timeout_s(n, floor, self.policy.capacity)

    def too_late(self, st: BackendState, deadline: Deadline) -> bool:
        """Less time left than the backend usually takes: the call would only be cut off (and waste it)."""
        usual = (st.latency_ewma_ms or 0.0) / 1000 * self.policy.min_attempt_share
        return deadline.remaining() < max(self.policy.min_attempt_s, usual)

    async def embed(
        self,
        st: BackendState,
        texts: Sequence[str],
        prompt_name: str | None,
        *,
        deadline: Deadline,
        purpose: Purpose = Purpose.REQUEST,
        permitted: bool = False,
        timeout_s: float | None = None,
        bulk: bool = False,
        merge: MergeHint | None = None,
    ) -> Embeddings:
        """One call; `texts` already carry the prompt when the backend expects that.

        `bulk`: a sub-batch of a multi-sub-batch request (it queues in the bulk lane).
        `merge`: the call may share a backend call with other requests' (coalescing), when the backend's
        vectors do not depend on the batch.

        `permitted`: the breaker's permission was taken by the caller (the router's attempt plan);
        every way out of here that is not a verdict on the backend gives it back.
        """
        verdict = False
        try:
            out = await self._admitted(st, texts, prompt_name, deadline, purpose, timeout_s, bulk, merge)
            verdict = True
            return out
        except BackendError as exc:
            verdict = purpose is Purpose.REQUEST and not isinstance(exc, PayloadTooLarge)
            raise
        finally:
            if permitted and not verdict:
                st.breaker.release()

    async def _admitted(
        self,
        st: BackendState,
        texts: Sequence[str],
        prompt_name: str | None,
        deadline: Deadline,
        purpose: Purpose,
        timeout_s: float | None,
        bulk: bool = False,
        merge: MergeHint | None = None,
    ) -> Embeddings:
        name = st.backend.name
        if purpose is Purpose.HEALTH:
            own = timeout_s if timeout_s is not None else self.call_timeout(st, len(texts))
            return await self._timed(st, texts, prompt_name, min(own, deadline.remaining()), purpose, Waiters())
        if self.too_late(st, deadline):
            raise DeadlineExceeded(f"the request's deadline left too little time to call backend {name!r}")
        if (
            merge is not None
            and purpose is Purpose.REQUEST
            and not bulk
            and timeout_s is None
            and st.batch_invariant
            and len(texts) < merge.limit
        ):
            return await self.coalescing.embed(st, texts, prompt_name, deadline, merge)
        return await self.alone(st, texts, prompt_name, deadline, purpose, timeout_s, bulk)

    async def alone(
        self,
        st: BackendState,
        texts: Sequence[str],
        prompt_name: str | None,
        deadline: Deadline,
        purpose: Purpose = Purpose.REQUEST,
        timeout_s: float | None = None,
        bulk: bool = False,
    ) -> Embeddings:
        """One call of these texts only: queue for a slot, call, wait within the request's deadline."""
        name = st.backend.name
        own = timeout_s if timeout_s is not None else self.call_timeout(st, len(texts))
        queued_at = time.perf_counter()
        # Agreement checks and shadows are background work: they wait behind client traffic.
        await self.queue(st, len(texts) + 1, deadline, bulk=bulk or purpose is not Purpose.REQUEST)
        self._metrics.admission_waited(name, time.perf_counter() - queued_at)
        if self.too_late(st, deadline):
            st.admission.release()
            raise DeadlineExceeded(f"the request's deadline passed while waiting for backend {name!r}")
        call, waiters = self.start(st, texts, prompt_name, own, purpose)
        remaining = deadline.remaining()
        try:
            if remaining >= own:  # the call's own timeout comes first: no second timer (hot path)
                return await asyncio.shield(call)
            try:
                async with asyncio.timeout(remaining):
                    return await asyncio.shield(call)
            except TimeoutError:  # the request's deadline (the call's own timeout raises BackendTimeout)
                if purpose is Purpose.REQUEST:
                    self._metrics.backend_call(name, "deadline", time.perf_counter() - queued_at)
                raise DeadlineExceeded(f"no answer from backend {name!r} within the request's deadline") from None
        except BaseException:
            if not call.done():
                waiters.left = True  # the client or its deadline went: whatever the call does now is nobody's
            raise

    async def queue(self, st: BackendState, units: int, deadline: Deadline | None, *, bulk: bool = False) -> None:
        """Wait for one of the backend's slots, `units` of work counted as queued meanwhile (the router's shed
        logic reads them); `deadline` None: until cancelled."""
        st.queued_units += units
        try:
            await st.admission.acquire(deadline.remaining() if deadline else None, bulk=bulk)
        except TimeoutError:
            raise self.queue_timeout(st) from None
        finally:
            st.queued_units -= units

    def queue_timeout(self, st: BackendState) -> DeadlineExceeded:
        """A request's deadline passed while it waited for one of the backend's slots (counted)."""
        name = st.backend.name
        self._metrics.admission_timeouts.labels(name).inc()
        return DeadlineExceeded(
            f"the request's deadline passed while waiting for backend {name!r} ({st.admission.limit} calls at a time)"
        )

    def start(
        self,
        st: BackendState,
        texts: Sequence[str],
        prompt_name: str | None,
        own: float,
        purpose: Purpose = Purpose.REQUEST,
    ) -> tuple[asyncio.Future[Embeddings], Waiters]:
        """Send a call on the slot just taken. It runs as its own task and frees the slot when the backend
        answers. A caller that stops waiting (client gone, request deadline) leaves it running: backends
        such as llama.cpp finish abandoned work anyway, so the slot stays taken until they have - the next
        calls queue here instead of piling onto a backend still busy with work nobody wants - and the
        backend is judged only on its own timeout, never on the client's."""
        waiters = Waiters()
        call = asyncio.ensure_future(self._timed(st, texts, prompt_name, own, purpose, waiters))
        call.add_done_callback(lambda task: _settle(task, st))
        return call, waiters

    async def _timed(
        self,
        st: BackendState,
        texts: Sequence[str],
        prompt_name: str | None,
        own: float,
        purpose: Purpose,
        waiters: Waiters,
    ) -> Embeddings:
        """The backend call itself, bounded by the backend's own timeout; the outcome is recorded."""
        backend = st.backend
        counts = purpose is Purpose.REQUEST
        st.in_flight += 1
        at_start = st.in_flight
        st.in_flight_units += len(texts) + 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(own):
                out = await backend.embed(texts, prompt_name, timeout_s=own)
            check_output(backend.name, out, len(texts), self._dimensions[backend.model])
        except TimeoutError as exc:
            error: BackendError = BackendTimeout(backend.name, f"no answer within {own:.1f}s for {len(texts)} texts")
            if purpose is not Purpose.CHECK:  # it takes longer than `own`: the next bound learns that
                st.times.overran(len(texts), own)
            # Abandoned work that ran long is not the backend's failure (a backend that answers nothing at all
            # fails its health checks instead).
            if counts and waiters.left:
                self._metrics.backend_call(backend.name, "abandoned", time.perf_counter() - started)
            elif counts:
                self._failed(st, error, time.perf_counter() - started)
            raise error from exc
        except Exception as exc:
            error = classify(backend.name, exc)
            if counts:
                self._failed(st, error, time.perf_counter() - started)
            raise error from exc
        finally:
            st.in_flight -= 1
            st.in_flight_units -= len(texts) + 1
        elapsed = time.perf_counter() - started
        if counts:
            busy = st.admission.saturated or st.admission.queued > 0
            st.capacity.observe(elapsed, st.times.unloaded_s(len(texts)), busy, at_start)
            st.breaker.record_success()
            st.record_success(elapsed)
            self._metrics.backend_call(backend.name, "ok", elapsed)
        if purpose is not Purpose.CHECK:  # checks queue as bulk behind traffic: their time says little
            st.times.observe(len(texts), elapsed)
        return out

    def health_result(
        self, st: BackendState, ok: bool, probing: bool, elapsed: float | None, healthy_threshold: int
    ) -> None:
        """A health check's outcome for the breaker and latency: written here, the call path being the one
        writer of traffic figures and breakers (the health monitor owns only `healthy`)."""
        breaker = st.breaker
        if ok:
            if elapsed is not None:
                st.observe_latency(elapsed)
            if probing or breaker.state is CircuitState.CLOSED:
                breaker.record_success()
            elif breaker.state is CircuitState.OPEN and st.check_streak + 1 >= healthy_threshold:
                # Passing checks in a row beat a long cool-down: the next check is the half-open probe.
                breaker.end_cooldown()
        else:
            breaker.record_failure()
        if probing and breaker.state is CircuitState.HALF_OPEN:
            breaker.release()

    def _failed(self, st: BackendState, error: BackendError, elapsed: float) -> None:
        self._metrics.backend_call(st.backend.name, error.kind, elapsed)
        if isinstance(error, InputRejected):
            st.breaker.record_success()  # the backend answered sensibly; the input was at fault
            return
        if isinstance(error, PayloadTooLarge):
            st.breaker.release()
            st.info = None  # its limits changed under us: the next health check learns them again
            return
        hold = error.retry_after if isinstance(error, BackendOverloaded) else None
        st.last_failure_kind = error.kind
        st.breaker.record_failure(hold_open_s=hold)
        st.record_failure(error.message)
        if st.should_log(error.message):
            level = logging.ERROR if isinstance(error, BackendMisconfigured) else logging.WARNING
            log.log(level, "backend %s failed (%s): %s", st.backend.name, error.kind, error.message)
