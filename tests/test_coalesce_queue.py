"""Coalescing in the admission queue, in process: who joins, who leaves, and what each request gets."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from backends.base import Embeddings
from backends.errors import BackendUnavailable, InputRejected
from gateway.errors import DeadlineExceeded, NoBackendAvailable
from gateway.metrics import Metrics
from gateway.resilience.deadline import Deadline
from gateway.router import Router, RoutingPolicy
from gateway.state import BackendState
from tests.fakes import InProcessBackend


class Recorder(InProcessBackend):
    """Answers each text with a vector derived from it after `delay`; records every call's texts."""

    def __init__(self, delay: float = 0.2, reject: str | None = None, fail: bool = False) -> None:
        super().__init__("b")
        self.delay, self.reject, self.fail = delay, reject, fail
        self.calls: list[list[str]] = []

    async def embed(
        self, texts: Sequence[str], prompt_name: str | None = None, timeout_s: float | None = None
    ) -> Embeddings:
        self.calls.append(list(texts))
        await asyncio.sleep(self.delay)
        if self.fail:
            raise BackendUnavailable(self.name, "down")
        if self.reject is not None and self.reject in texts:
            raise InputRejected(self.name, f"cannot embed {self.reject!r}")
        return Embeddings(np.asarray([[len(t), 1.0, 0.0, 0.0] for t in texts], dtype=np.float32))


def setup(backend: Recorder, slots: int = 1) -> tuple[Router, BackendState, Metrics]:
    metrics = Metrics()
    st = BackendState(backend)
    st.batch_invariant = True
    st.admission.set_limit(slots)
    router = Router([st], {"m": 4}, metrics, RoutingPolicy(), coalesce_s={"m": 0.002})
    return router, st, metrics


async def test_queued_requests_share_one_call_and_each_gets_its_own_rows() -> None:
    backend = Recorder()
    router, st, _ = setup(backend)
    first = asyncio.ensure_future(router.embed("m", ["a"]))
    await asyncio.sleep(0.05)  # the one slot is busy
    texts = ["bb", "ccc", "dddd"]
    rest = [asyncio.ensure_future(router.embed("m", [t])) for t in texts]
    await asyncio.sleep(0.05)
    assert st.queued_units == 2 * len(texts)  # waiting to merge is queued work the shed logic sees
    results = await asyncio.gather(first, *rest)
    assert backend.calls == [["a"], texts]
    assert [r.vectors[0][0] for r in results[1:]] == [2, 3, 4]
    assert st.queued_units == 0 and st.admission.active == 0


async def test_a_group_everybody_left_leaves_the_queue_and_newcomers_are_not_stuck_behind_it() -> None:
    backend = Recorder()
    router, st, _ = setup(backend)
    first = asyncio.ensure_future(router.embed("m", ["a"]))
    await asyncio.sleep(0.05)
    leavers = [asyncio.ensure_future(router.embed("m", [t])) for t in ("x", "y")]
    await asyncio.sleep(0.01)
    assert st.admission.queued == 1
    for t in leavers:
        t.cancel()
    newcomer = asyncio.ensure_future(router.embed("m", ["late"], deadline=Deadline(2)))  # same tick as the leaving
    await asyncio.gather(*leavers, return_exceptions=True)
    assert (await newcomer).vectors[0][0] == 4
    await first
    assert ["x"] not in backend.calls and ["y"] not in backend.calls and ["x", "y"] not in backend.calls
    assert st.queued_units == 0 and st.admission.queued == 0 and st.admission.active == 0


async def test_a_short_deadline_leaves_the_group_and_the_others_are_answered() -> None:
    backend = Recorder()
    router, _, metrics = setup(backend)
    first = asyncio.ensure_future(router.embed("m", ["a"]))
    await asyncio.sleep(0.05)
    hurried = asyncio.ensure_future(router.embed("m", ["hurried"], deadline=Deadline(0.05)))
    patient = asyncio.ensure_future(router.embed("m", ["patient"]))
    with pytest.raises(DeadlineExceeded):
        await hurried
    assert (await patient).vectors[0][0] == len("patient")
    await first
    assert backend.calls == [["a"], ["patient"]]
    assert metrics.admission_timeouts.labels("b")._value.get() == 1


async def test_an_input_the_backend_refuses_fails_only_its_own_request() -> None:
    backend = Recorder(reject="bad")
    router, _, _ = setup(backend)
    first = asyncio.ensure_future(router.embed("m", ["a"]))
    await asyncio.sleep(0.05)
    merged = [asyncio.ensure_future(router.embed("m", [t])) for t in ("good", "bad", "fine")]
    outcomes = await asyncio.gather(*merged, return_exceptions=True)
    await first
    assert isinstance(outcomes[1], InputRejected)
    assert [o.vectors[0][0] for o in (outcomes[0], outcomes[2])] == [4, 4]  # type: ignore[union-attr]
    assert ["good", "bad", "fine"] in backend.calls  # merged, failed, then each alone
    assert ["good"] in backend.calls and ["fine"] in backend.calls


async def test_a_failing_backend_fails_the_merged_requests_once_not_once_each() -> None:
    backend = Recorder(fail=True, delay=0.1)
    router, _, _ = setup(backend)
    first = asyncio.ensure_future(router.embed("m", ["a"]))
    await asyncio.sleep(0.02)
    merged = [asyncio.ensure_future(router.embed("m", [t])) for t in ("p", "q", "r")]
    outcomes = await asyncio.gather(first, *merged, return_exceptions=True)
    assert all(isinstance(o, NoBackendAvailable) for o in outcomes)
    assert backend.calls[:2] == [["a"], ["p", "q", "r"]]  # the group is not retried alone on a dead backend
    assert ["p"] not in backend.calls


async def test_a_backend_not_known_to_be_batch_invariant_gets_one_call_per_request() -> None:
    backend = Recorder()
    router, st, _ = setup(backend)
    st.batch_invariant = None
    first = asyncio.ensure_future(router.embed("m", ["a"]))
    await asyncio.sleep(0.05)
    await asyncio.gather(first, *(router.embed("m", [t]) for t in ("p", "q")))
    assert backend.calls == [["a"], ["p"], ["q"]]
