"""The resilience policies, each on its own: breaker, deadline, batching + reassembly, hedging."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.base import Embeddings
from gateway.api.inputs import request_timeout
from gateway.errors import InvalidRequest
from gateway.metrics import Metrics
from gateway.resilience.batching import split
from gateway.resilience.breaker import BreakerPolicy, CircuitBreaker, CircuitState
from gateway.resilience.deadline import Deadline
from gateway.resilience.hedge import hedged
from gateway.router import Router, RoutingPolicy
from gateway.state import BackendState
from tests.fakes import InProcessBackend


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def breaker(**kw: float) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(BreakerPolicy(**kw), clock=clock), clock  # type: ignore[arg-type]


def test_opens_after_consecutive_failures_and_lets_one_probe_through() -> None:
    b, clock = breaker(consecutive_failures=3, cooldown_s=2)
    for _ in range(2):
        b.record_failure()
    assert b.state is CircuitState.CLOSED and b.allow()
    b.record_failure()
    assert b.state is CircuitState.OPEN and not b.allow() and b.remaining_open_s() == 2
    clock.t += 2
    assert b.state is CircuitState.HALF_OPEN
    assert b.allow() and not b.allow()  # exactly one probe
    b.record_success()
    assert b.state is CircuitState.CLOSED and b.allow()


def test_success_resets_the_consecutive_count() -> None:
    b, _ = breaker(consecutive_failures=3, min_calls=100)
    for _ in range(10):
        b.record_failure()
        b.record_failure()
        b.record_success()
    assert b.state is CircuitState.CLOSED


def test_opens_on_failure_ratio_over_the_window_only_with_enough_calls() -> None:
    b, _ = breaker(consecutive_failures=100, failure_ratio=0.5, min_calls=10, window_s=10)
    for i in range(9):
        (b.record_failure if i % 2 else b.record_success)()
    assert b.state is CircuitState.CLOSED  # 4 of 9: too few calls to judge
    b.record_failure()
    assert b.state is CircuitState.OPEN  # 5 of 10
    b2, clock2 = breaker(consecutive_failures=100, failure_ratio=0.5, min_calls=4, window_s=10)
    b2.record_failure()
    b2.record_failure()
    clock2.t += 11  # those fell out of the window
    b2.record_success()
    b2.record_failure()
    assert b2.state is CircuitState.CLOSED


def test_cooldown_grows_on_repeated_trips_and_is_capped() -> None:
    b, clock = breaker(consecutive_failures=1, cooldown_s=1, cooldown_max_s=5, cooldown_multiplier=2)
    seen = []
    for _ in range(5):
        b.record_failure()  # trips (closed) or re-trips (half-open probe failed)
        seen.append(b.remaining_open_s())
        clock.t += seen[-1]
        assert b.allow()  # the half-open probe...
    assert seen == [1, 2, 4, 5, 5]
    b.record_success()
    assert b.state is CircuitState.CLOSED and b.trips == 5


def test_retry_after_holds_the_circuit_open_and_release_frees_the_probe() -> None:
    b, clock = breaker(consecutive_failures=5, cooldown_s=1)
    b.record_failure(hold_open_s=7)
    assert b.state is CircuitState.OPEN and b.remaining_open_s() == 7
    clock.t += 7
    assert b.allow() and not b.allow()
    b.release()  # the probe was cancelled: someone else may probe
    assert b.allow()


def test_deadline_and_timeout_header() -> None:
    clock = Clock()
    d = Deadline(2.0, clock=clock)
    assert d.remaining() == 2 and d.cap(5) == 2 and not d.expired
    clock.t += 2.5
    assert d.expired and d.remaining() == 0
    assert request_timeout(None) is None and request_timeout("1.5") == 1.5
    for bad in ("0", "-1", "soon", "nan"):
        with pytest.raises(InvalidRequest, match="x-request-timeout"):
            request_timeout(bad)


def vector_of(text: str, dim: int = 8) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).normal(size=dim).astype(np.float32)


class Deterministic(InProcessBackend):
    """A backend whose vector for a text depends on the text alone (like a real model)."""

    def __init__(self, name: str, priority: int = 0, fail_every: int = 0) -> None:
        super().__init__(name, priority)
        self.batches: list[int] = []
        self.fail_every = fail_every

    async def embed(
        self, texts: Sequence[str], prompt_name: str | None = None, timeout_s: float | None = None
    ) -> Embeddings:
        self.batches.append(len(texts))
        await asyncio.sleep(0.001 * (len(self.batches) % 3))  # finish out of order
        if self.fail_every and len(self.batches) % self.fail_every == 0:
            from backends.errors import BackendUnavailable

            raise BackendUnavailable(self.name, "flaky")
        return Embeddings(np.stack([vector_of(t) for t in texts]))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 120), chunk=st.integers(1, 40), concurrency=st.integers(1, 6), flaky=st.booleans())
def test_any_split_keeps_input_order_and_equals_the_unsplit_result(
    n: int, chunk: int, concurrency: int, flaky: bool
) -> None:
    texts = [f"text {i} {'x' * (i % 5)}" for i in range(n)]
    a, b = Deterministic("a", 0, fail_every=3 if flaky else 0), Deterministic("b", 1)
    policy = RoutingPolicy(batch_size=chunk, subbatch_concurrency=concurrency)
    router = Router([BackendState(a), BackendState(b)], {"m": 8}, Metrics(), policy)
    routed = asyncio.run(router.embed("m", texts))
    unsplit = np.stack([vector_of(t) for t in texts])
    np.testing.assert_array_equal(routed.vectors, unsplit)
    assert max(a.batches + b.batches) <= chunk
    assert sum(x.stop - x.start for x in split(texts, chunk)) == n


def test_split_respects_a_token_budget() -> None:
    texts = ["a" * 300, "b" * 300, "c", "d" * 900]
    slices = split(texts, max_items=10, max_tokens=150)  # about 102, 102, 2 and 302 tokens
    assert [texts[s] for s in slices] == [["a" * 300], ["b" * 300, "c"], ["d" * 900]]


async def test_hedging_takes_the_first_answer_and_cancels_the_loser() -> None:
    cancelled = asyncio.Event()

    async def slow() -> str:
        try:
            await asyncio.sleep(5)
            return "slow"
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def fast() -> str:
        await asyncio.sleep(0.01)
        return "fast"

    assert await hedged(slow, fast, delay=0.05) == "fast"
    assert cancelled.is_set()
    assert await hedged(fast, slow, delay=1.0) == "fast"  # no hedge needed

    async def broken() -> str:
        raise RuntimeError("first failed")

    with pytest.raises(RuntimeError):  # a fast failure is the router's to retry elsewhere
        await hedged(broken, fast, delay=1.0)


async def test_hedged_router_answers_from_the_second_backend_when_the_first_is_slow() -> None:
    class Slow(Deterministic):
        async def embed(
            self, texts: Sequence[str], prompt_name: str | None = None, timeout_s: float | None = None
        ) -> Embeddings:
            await asyncio.sleep(2)
            return await super().embed(texts, prompt_name)

    slow, quick = Slow("slow", 0), Deterministic("quick", 1)
    metrics = Metrics()
    router = Router([BackendState(slow), BackendState(quick)], {"m": 8}, metrics, RoutingPolicy(hedge_after_s=0.05))
    loop = asyncio.get_running_loop()
    started = loop.time()
    routed = await router.embed("m", ["x"])
    assert routed.backends == ("quick",) and loop.time() - started < 1.0
    assert metrics.hedges.labels("m")._value.get() == 1


async def test_deadline_passing_gives_deadline_exceeded_not_a_hang() -> None:
    from gateway.errors import DeadlineExceeded

    class Stuck(Deterministic):
        async def embed(
            self, texts: Sequence[str], prompt_name: str | None = None, timeout_s: float | None = None
        ) -> Embeddings:
            await asyncio.sleep(30)
            raise AssertionError("unreachable")

    router = Router([BackendState(Stuck("stuck"))], {"m": 8}, Metrics())
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DeadlineExceeded):
        await router.embed("m", ["x"], deadline=Deadline(0.3))
    assert loop.time() - started < 1.0


def test_end_cooldown_moves_an_open_circuit_to_half_open() -> None:
    b, _ = breaker(consecutive_failures=1, cooldown_s=60)
    b.record_failure()
    assert b.state is CircuitState.OPEN
    b.end_cooldown()
    assert b.state is CircuitState.HALF_OPEN and b.allow() and not b.allow()


def test_end_cooldown_never_cuts_a_retry_after_short() -> None:
    b, clock = breaker(consecutive_failures=5, cooldown_s=1)
    b.record_failure(hold_open_s=30)
    b.end_cooldown()
    assert b.state is CircuitState.OPEN and b.remaining_open_s() == 30
    clock.t += 30
    assert b.state is CircuitState.HALF_OPEN
