"""The guarded call path and its neighbours, in process (issue 8, items 1, 3, 11): deadlines versus
backend timeouts, admission, hedging with nobody to hedge with, honest counters, a checker that fails."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import numpy as np
import pytest

from backends.base import Embeddings
from backends.errors import BackendUnavailable
from config.profiles import ModelProfile
from config.settings import ConsistencySettings
from gateway.consistency import service as consistency_service
from gateway.consistency.service import ConsistencyService
from gateway.errors import DeadlineExceeded, NoBackendAvailable
from gateway.metrics import Metrics
from gateway.resilience.admission import Admission
from gateway.resilience.breaker import CircuitState
from gateway.resilience.deadline import Deadline
from gateway.router import Router, RoutingPolicy
from gateway.state import BackendState
from tests.fakes import InProcessBackend


class Timed(InProcessBackend):
    """Answers after `delay` seconds (or fails), counting calls and the most it had at once."""

    def __init__(self, name: str, priority: int = 0, delay: float = 0.0, fail: bool = False) -> None:
        super().__init__(name, priority)
        self.delay, self.fail = delay, fail
        self.calls = self.active = self.peak = 0

    async def embed(
        self, texts: Sequence[str], prompt_name: str | None = None, timeout_s: float | None = None
    ) -> Embeddings:
        self.calls += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        if self.fail:
            raise BackendUnavailable(self.name, "failing on purpose")
        return Embeddings(np.ones((len(texts), 4), dtype=np.float32))


def router_for(*backends: Timed, **policy: object) -> tuple[Router, Metrics, list[BackendState]]:
    metrics = Metrics()
    states = [BackendState(b) for b in backends]
    return Router(states, {"m": 4}, metrics, RoutingPolicy(**policy)), metrics, states  # type: ignore[arg-type]


async def test_expired_deadlines_never_reach_a_backend_or_its_breaker() -> None:
    a, b = Timed("a", 0, delay=0.05), Timed("b", 1, delay=0.05)
    router, _, states = router_for(a, b)
    for _ in range(60):
        with pytest.raises(DeadlineExceeded):
            await router.embed("m", ["x"], deadline=Deadline(0.000001))
    assert a.calls == b.calls == 0
    assert all(st.breaker.state is CircuitState.CLOSED and st.breaker.trips == 0 for st in states)
    assert (await router.embed("m", ["x"])).backends == ("a",)


async def test_a_deadline_that_cuts_a_call_is_not_a_backend_failure() -> None:
    slow = Timed("slow", delay=0.5)
    router, metrics, states = router_for(slow)
    for _ in range(8):
        with pytest.raises(DeadlineExceeded):
            await router.embed("m", ["x"], deadline=Deadline(0.05))
    st = states[0]
    assert st.breaker.state is CircuitState.CLOSED and st.failures == 0 and st.latency_ewma_ms is None
    # Cut at the backend, or still queued for one of its slots when the deadline came: never a failure.
    cut = metrics.backend_calls.labels("slow", "deadline")._value.get()
    assert cut + metrics.admission_timeouts.labels("slow")._value.get() == 8 and cut >= 1
    assert metrics.inputs.labels("m")._value.get() == 0  # nothing was served


async def test_admission_bounds_calls_at_a_backend_and_queue_time_is_not_call_time() -> None:
    slow = Timed("slow", delay=0.2)
    router, _, states = router_for(slow)
    states[0].capacity.reset(2)  # it declares two slots
    results = await asyncio.gather(*(router.embed("m", [f"t{i}"]) for i in range(6)))
    assert len(results) == 6 and slow.peak == 2  # never more than its two slots at once
    # Each call took ~0.2 s at the backend although the last waited ~0.4 s in the queue.
    assert states[0].latency_ewma_ms is not None and states[0].latency_ewma_ms < 350
    assert states[0].breaker.trips == 0


async def test_admission_is_first_come_first_served_and_honours_timeouts() -> None:
    adm = Admission(1)
    await adm.acquire(1)
    order: list[int] = []

    async def waiter(i: int) -> None:
        await adm.acquire(5)
        order.append(i)
        adm.release()

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    with pytest.raises(TimeoutError):
        await adm.acquire(0.01)
    assert adm.queued == 3
    adm.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2] and adm.active == 0 and adm.queued == 0


async def test_hedge_with_nobody_to_hedge_with_lets_the_first_call_decide() -> None:
    failing, other = Timed("failing", 0, delay=0.3, fail=True), Timed("other", 1)
    router, _, states = router_for(failing, other, hedge_after_s=0.05)

    async def other_goes_down() -> None:
        await asyncio.sleep(0.01)
        states[1].healthy = False  # between the first call and the hedge: nobody left to hedge with

    loop = asyncio.get_running_loop()
    started = loop.time()
    down = asyncio.create_task(other_goes_down())
    with pytest.raises(NoBackendAvailable):
        await router.embed("m", ["x"], deadline=Deadline(10))
    await down
    assert loop.time() - started < 5  # not held until the deadline
    assert failing.peak == 1  # the hedge never doubled up on the backend already working on it
    assert other.calls == 0


async def test_inputs_count_texts_served_only() -> None:
    router, metrics, _ = router_for(Timed("down", fail=True))
    with pytest.raises(NoBackendAvailable):
        await router.embed("m", ["a", "b"])
    assert metrics.inputs.labels("m")._value.get() == 0
    router, metrics, _ = router_for(Timed("up"))
    await router.embed("m", ["a", "b"])
    assert metrics.inputs.labels("m")._value.get() == 2


async def test_a_failing_agreement_check_is_logged_once_and_shown(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        async def run(self) -> None:
            raise RuntimeError("probe set exploded")

    monkeypatch.setattr(consistency_service, "Checker", Broken)
    ref, st = BackendState(Timed("a")), BackendState(Timed("b", 1))
    ref.healthy = st.healthy = True
    profile = ModelProfile(dimension=4, pooling="mean", max_input_tokens=512)
    service = ConsistencyService(ConsistencySettings(interval_s=0.05), {"m": profile}, [ref, st], {"m": None})
    with caplog.at_level(logging.ERROR):
        service.start()
        await asyncio.sleep(0.5)  # several failing rounds
        await service.stop()
    assert "probe set exploded" in service.errors["m"]
    assert st.agreement_detail is not None and "probe set exploded" in st.agreement_detail  # still pending
    assert len([r for r in caplog.records if "probe set exploded" in r.getMessage()]) == 1


async def test_small_requests_pass_queued_bulk_work_without_starving_it() -> None:
    adm = Admission(1)
    await adm.acquire(1)
    order: list[str] = []

    async def waiter(name: str, bulk: bool) -> None:
        await adm.acquire(5, bulk=bulk)
        order.append(name)
        await asyncio.sleep(0)
        adm.release()

    tasks = [asyncio.create_task(waiter(f"bulk{i}", True)) for i in range(4)]
    await asyncio.sleep(0.01)
    tasks += [asyncio.create_task(waiter(f"small{i}", False)) for i in range(4)]
    await asyncio.sleep(0.01)
    adm.release()
    await asyncio.gather(*tasks)
    # Small requests go first, but bulk gets at least one grant in every three while both wait.
    assert order[:3] == ["small0", "small1", "bulk0"], order
    assert sorted(order) == sorted([f"bulk{i}" for i in range(4)] + [f"small{i}" for i in range(4)])
    assert adm.active == 0 and adm.queued == 0
