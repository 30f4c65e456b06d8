"""Per-backend admission control: at most `limit` calls in flight at the backend, the rest queue here.

A backend that is handed more concurrent work than it has slots (llama.cpp `--parallel`, TEI
`max_concurrent_requests`) queues it internally, where the gateway cannot see it: its calls then time
out while they merely wait, and those timeouts trip its circuit. Queueing in the gateway instead keeps
the backend's own latency honest (a call's timeout covers its work only), lets the router see the queue
(and overflow to another backend when waiting here would take longer), and lets a request leave the
queue when its deadline or its client goes away.

Two lanes, first come first served within each: calls of small requests (one sub-batch) and the
sub-batches of bulk requests. A free slot goes to the small lane first, but at least every
`BULK_SHARE`-th grant goes to bulk when bulk is waiting: a re-index cannot starve interactive queries
(their p99 beside 2048-text requests was seconds), and interactive traffic cannot starve a re-index.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque

BULK_SHARE = 3  # of every 3 grants while both lanes wait, at least 1 goes to bulk


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.active = 0
        self._small: deque[asyncio.Future[None]] = deque()
        self._bulk: deque[asyncio.Future[None]] = deque()
        self._small_streak = 0

    @property
    def queued(self) -> int:
        return sum(1 for lane in (self._small, self._bulk) for f in lane if not f.done())

    @property
    def saturated(self) -> bool:
        return self.active >= self.limit

    def expected_wait_s(self, call_s: float) -> float:
        """How long a new call would queue here, given calls of about `call_s` seconds."""
        if self.active < self.limit:
            return 0.0
        return math.ceil((self.queued + 1) / self.limit) * call_s

    def set_limit(self, limit: int) -> None:
        self.limit = max(1, limit)
        while self.active < self.limit and self._grant_next(new_slot=True):
            pass

    async def acquire(self, timeout_s: float | None, *, bulk: bool = False) -> None:
        """Take a slot, waiting at most `timeout_s` (TimeoutError; None: until cancelled), first come first
        served per lane."""
        if self.active < self.limit and not self._small and not self._bulk:
            self.active += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane = self._bulk if bulk else self._small
        lane.append(fut)
        try:
            async with asyncio.timeout(timeout_s):
                await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    lane.remove(fut)
            raise

    def release(self) -> None:
        if not self._grant_next(new_slot=False):
            self.active = max(0, self.active - 1)

    def _grant_next(self, *, new_slot: bool) -> bool:
        while self._small or self._bulk:
            bulk_turn = bool(self._bulk) and (not self._small or self._small_streak >= BULK_SHARE - 1)
            fut = (self._bulk if bulk_turn else self._small).popleft()
            if fut.done():
                continue
            self._small_streak = 0 if bulk_turn else self._small_streak + 1
            fut.set_result(None)  # the slot passes straight to the next waiter
            if new_slot:
                self.active += 1
            return True
        return False
