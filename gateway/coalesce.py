"""Coalescing: concurrent requests to one backend with one prompt share one backend call.

Most traffic is one text per request, and most embedding servers pay a fixed cost per call (vLLM and
Infinity embed 2-2.8x more texts per second in batches of 16 than one by one; hosted services count
requests). The merging happens at the backend's admission queue, where requests wait anyway:

- a request that finds a free slot and no other call of its prompt in flight at the backend goes at once
  (no added latency at low load);
- one that arrives while such a call is in flight, or while every slot is busy, joins the key's open group:
  the group waits up to the model's `coalesce_ms` for more (or until full, at the backend's batch limit)
  when a slot is free, and otherwise queues for the next slot like any call, taking in arrivals until it
  gets one. Then it goes as one call and the vectors are split back to each request in order.

The group's texts count as queued work (the router's shed logic and balancer see them) and each request
keeps its own deadline, its cancellation (a client that left before the call was sent takes its texts out;
when everybody left, the group leaves the queue) and its errors: a merged call that fails on an input (the
backend refused one, or the batch was too large) is retried request by request, so one request's bad input
never fails another's; a failure of the backend itself reaches every request, whose router tries the next
backend. Only backends whose vectors do not depend on batch composition take merged calls (the agreement
checker measures it: `BackendState.batch_invariant`). The key is the prompt *name*: texts reach this point
with their prompt applied unless the backend applies a named one, so texts of different prompts mix freely.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from backends.base import Embeddings
from backends.errors import BackendError, InputRejected, PayloadTooLarge
from gateway.errors import DeadlineExceeded
from gateway.metrics import Metrics
from gateway.resilience.deadline import Deadline
from gateway.state import BackendState

if TYPE_CHECKING:
    from gateway.calls import BackendCalls, Waiters


@dataclass(frozen=True, slots=True)
class MergeHint:
    window_s: float  # how long a group waits for more while a slot is free
    limit: int  # most texts in one merged call (the backend's batch limit)


class _Alone(Exception):
    """The merged call failed on an input: the request goes again by itself."""


_Key = tuple[str, str | None]  # (backend, prompt name)


@dataclass(eq=False, slots=True)
class _Member:
    texts: Sequence[str]
    deadline: Deadline
    future: asyncio.Future[np.ndarray]
    queued: bool = True  # its texts count in the backend's queued work


@dataclass(eq=False)
class _Group:
    key: _Key
    members: list[_Member] = field(default_factory=list)
    texts: int = 0
    full: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    waiters: Waiters | None = None  # set when sent

    def live(self) -> list[_Member]:
        return [m for m in self.members if not m.future.done()]


class Coalescing:
    def __init__(self, calls: BackendCalls, metrics: Metrics) -> None:
        self._calls = calls
        self._metrics = metrics
        self._open: dict[_Key, _Group] = {}  # the group still taking requests, per key
        self._in_flight: dict[_Key, int] = {}  # calls of the key at the backend now
        self._tasks: set[asyncio.Task[None]] = set()

    async def embed(
        self, st: BackendState, texts: Sequence[str], prompt_name: str | None, deadline: Deadline, merge: MergeHint
    ) -> Embeddings:
        key = (st.backend.name, prompt_name)
        group = self._open.get(key)
        if group is None or group.texts + len(texts) > merge.limit:
            if group is None and not self._in_flight.get(key) and not _busy(st):
                return await self._alone(key, st, texts, prompt_name, deadline)  # nothing to wait for
            group = self._open[key] = _Group(key)
            group.task = asyncio.get_running_loop().create_task(self._run(key, st, prompt_name, group, merge))
            self._tasks.add(group.task)
            group.task.add_done_callback(self._tasks.discard)
        member = _Member(texts, deadline, asyncio.get_running_loop().create_future())
        group.members.append(member)
        group.texts += len(texts)
        st.queued_units += len(texts) + 1
        if group.texts >= merge.limit:
            group.full.set()
        try:
            async with asyncio.timeout(max(0.0, deadline.remaining())):
                rows = await asyncio.shield(member.future)
        except TimeoutError:
            raise self._late(st, group) from None
        except _Alone:
            return await self._alone(key, st, texts, prompt_name, deadline)
        finally:
            if not member.future.done():
                member.future.cancel()
                self._left(st, group, member)
        return Embeddings(rows)

    async def _alone(
        self, key: _Key, st: BackendState, texts: Sequence[str], prompt_name: str | None, deadline: Deadline
    ) -> Embeddings:
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            return await self._calls.alone(st, texts, prompt_name, deadline)
        finally:
            self._in_flight[key] -= 1

    def _late(self, st: BackendState, group: _Group) -> DeadlineExceeded:
        if group.waiters is None:  # still queued
            return self._calls.queue_timeout(st)
        return DeadlineExceeded(f"no answer from backend {st.backend.name!r} within the request's deadline")

    def _left(self, st: BackendState, group: _Group, member: _Member) -> None:
        """A request stopped waiting (deadline, client gone): its texts leave a group not yet sent; a group
        everybody left leaves the queue, and a sent call nobody waits for is abandoned work."""
        _unqueue(st, member)
        if group.live():
            return
        if group.waiters is not None:
            group.waiters.left = True
        elif group.task is not None:
            if self._open.get(group.key) is group:  # nobody may join a group on its way out
                del self._open[group.key]
            group.task.cancel()

    async def _run(self, key: _Key, st: BackendState, prompt_name: str | None, group: _Group, merge: MergeHint) -> None:
        queued_at = time.perf_counter()
        try:
            if not _busy(st):  # a slot is free: wait a little for company (the queue is wait enough otherwise)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(merge.window_s):
                        await group.full.wait()
            await self._calls.queue(st, 0, None)  # the members' texts are counted as queued already
        except BaseException:  # everybody left (cancelled)
            self._close(key, st, group)
            raise
        self._close(key, st, group)
        self._metrics.admission_waited(st.backend.name, time.perf_counter() - queued_at)
        for m in group.live():
            if self._calls.too_late(st, m.deadline):
                m.future.set_exception(
                    DeadlineExceeded(f"the request's deadline passed while waiting for backend {st.backend.name!r}")
                )
        live = group.live()
        if not live:
            st.admission.release()
            return
        texts = [t for m in live for t in m.texts]
        own = self._calls.call_timeout(st, len(texts))
        call, group.waiters = self._calls.start(st, texts, prompt_name, own)
        if len(live) > 1:
            self._metrics.batch_texts.observe(len(texts))
            self._metrics.coalesced_requests.labels(st.backend.name).inc(len(live))
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            out = await asyncio.shield(call)
        except asyncio.CancelledError:  # shut down: nobody is left to answer
            for m in live:
                m.future.cancel()
            raise
        except BackendError as exc:
            # An input's problem is retried request by request (one bad input fails only its request); the
            # backend's own failure is every request's, and each router tries its next backend.
            alone = len(live) > 1 and isinstance(exc, InputRejected | PayloadTooLarge)
            for m in live:
                if not m.future.done():
                    m.future.set_exception(_Alone() if alone else exc)
            return
        finally:
            self._in_flight[key] -= 1
        start = 0
        for m in live:
            end = start + len(m.texts)
            if not m.future.done():
                m.future.set_result(np.ascontiguousarray(out.vectors[start:end]))
            start = end

    def _close(self, key: _Key, st: BackendState, group: _Group) -> None:
        """The group takes nobody more: sent, or everybody left."""
        if self._open.get(key) is group:
            del self._open[key]
        for m in group.members:
            _unqueue(st, m)


def _busy(st: BackendState) -> bool:
    return st.admission.saturated or st.admission.queued > 0


def _unqueue(st: BackendState, member: _Member) -> None:
    if member.queued:
        member.queued = False
        st.queued_units -= len(member.texts) + 1
