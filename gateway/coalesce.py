"""Coalescing: concurrent requests for one model and prompt share one backend call.

Most traffic is one text per request, and most embedding servers pay a fixed cost per call (vLLM and
Infinity embed 2-2.8x more texts per second in batches of 16 than one by one; hosted services count
requests). A request that finds no other call of its model and prompt in flight goes at once (no added
latency at low load); one that arrives while others are in flight waits up to `coalesce_ms` for more and
goes with them in one call, up to the batch limit. The vectors are split back to each request in order.

Each request keeps its own deadline (it stops waiting when its deadline passes; the merged call runs on
the latest deadline among the requests still waiting), its cancellation (a client that left before the
call was sent takes its texts out), and its errors: a merged call that fails is retried request by request,
so one request's bad input never fails another's. Only backends whose vectors do not depend on batch
composition take merged calls (the agreement checker measures it: `BackendState.batch_invariant`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from gateway.errors import DeadlineExceeded
from gateway.metrics import Metrics
from gateway.pipeline import Prompt
from gateway.resilience.deadline import Deadline
from gateway.router import Routed

# (model, texts, prompt, deadline, longest tokens, coalesced) -> vectors in order and the backends used
Call = Callable[[str, list[str], Prompt, Deadline, int | None, bool], Awaitable[Routed]]


@dataclass(eq=False)
class _Waiter:
    texts: list[str]
    deadline: Deadline
    longest: int | None
    future: asyncio.Future[Routed]


@dataclass(eq=False)
class _Batch:
    waiters: list[_Waiter] = field(default_factory=list)
    texts: int = 0
    full: asyncio.Event = field(default_factory=asyncio.Event)


class Coalescer:
    def __init__(
        self,
        call: Call,
        windows_s: dict[str, float],
        limit: Callable[[str], int],
        can_merge: Callable[[str], bool],
        metrics: Metrics,
    ) -> None:
        self._call = call
        self._can_merge = can_merge  # a backend in service takes merged calls (its vectors batch-invariant)
        self._tasks: set[asyncio.Task[None]] = set()
        self._windows = {m: w for m, w in windows_s.items() if w > 0}
        self._limit = limit  # texts per merged call for a model (its backends' batch limit)
        self._metrics = metrics
        self._open: dict[tuple[str, str | None], _Batch] = {}  # the batch still taking requests, per key
        self._in_flight: dict[tuple[str, str | None], int] = {}  # calls of the key at the backends now

    def enabled(self, model: str) -> bool:
        return model in self._windows

    async def embed(
        self, model: str, texts: list[str], prompt: Prompt, deadline: Deadline, longest: int | None
    ) -> Routed:
        if not self.enabled(model):  # the default: straight to the router, nothing counted
            return await self._call(model, texts, prompt, deadline, longest, False)
        key = (model, prompt.name or prompt.prefix)
        if not self._can_merge(model) or len(texts) >= (limit := self._limit(model)):
            return await self._alone(key, model, texts, prompt, deadline, longest)
        batch = self._open.get(key)
        if batch is None and not self._in_flight.get(key):
            return await self._alone(key, model, texts, prompt, deadline, longest)  # nothing to wait for
        if batch is None or batch.texts + len(texts) > limit:
            batch = self._open[key] = _Batch()
            task = asyncio.get_running_loop().create_task(self._flush_later(key, model, prompt, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        waiter = _Waiter(texts, deadline, longest, asyncio.get_running_loop().create_future())
        batch.waiters.append(waiter)
        batch.texts += len(texts)
        if batch.texts >= limit:
            batch.full.set()
        try:
            async with asyncio.timeout(max(0.0, deadline.remaining())):
                return await asyncio.shield(waiter.future)
        except TimeoutError:
            raise DeadlineExceeded(f"the request's deadline passed while model {model!r} was called") from None
        finally:
            if not waiter.future.done():
                waiter.future.cancel()  # not sent yet: its texts stay out; sent: nobody waits for them

    async def _alone(
        self,
        key: tuple[str, str | None],
        model: str,
        texts: list[str],
        prompt: Prompt,
        deadline: Deadline,
        longest: int | None,
    ) -> Routed:
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            return await self._call(model, texts, prompt, deadline, longest, False)
        finally:
            self._in_flight[key] -= 1

    async def _flush_later(self, key: tuple[str, str | None], model: str, prompt: Prompt, batch: _Batch) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._windows[model]):
                await batch.full.wait()
        if self._open.get(key) is batch:
            del self._open[key]
        waiting = [w for w in batch.waiters if not w.future.done()]  # a client that left takes its texts out
        if not waiting:
            return
        if len(waiting) == 1:
            w = waiting[0]
            await self._settle_alone(key, model, w, prompt)
            return
        texts = [t for w in waiting for t in w.texts]
        deadline = max((w.deadline for w in waiting), key=lambda d: d.remaining())
        longest = max((w.longest for w in waiting if w.longest is not None), default=None)
        self._metrics.batch_texts.observe(len(texts))
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            routed = await self._call(model, texts, prompt, deadline, longest, True)
        except Exception:
            # One request's problem (an input a backend refuses, a deadline) must not fail the others: each
            # is sent on its own, with its own deadline.
            await asyncio.gather(*(self._settle_alone(key, model, w, prompt) for w in waiting))
            return
        finally:
            self._in_flight[key] -= 1
        for backend in routed.backends:
            self._metrics.coalesced_requests.labels(backend).inc(len(waiting))
        start = 0
        for w in waiting:
            end = start + len(w.texts)
            if not w.future.done():
                w.future.set_result(Routed(np.ascontiguousarray(routed.vectors[start:end]), routed.backends))
            start = end

    async def _settle_alone(self, key: tuple[str, str | None], model: str, w: _Waiter, prompt: Prompt) -> None:
        if w.future.done():
            return
        try:
            routed = await self._alone(key, model, w.texts, prompt, w.deadline, w.longest)
        except Exception as exc:
            if not w.future.done():
                w.future.set_exception(exc)
            return
        if not w.future.done():
            w.future.set_result(routed)
