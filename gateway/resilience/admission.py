"""Per-backend admission control: at most `limit` calls in flight at the backend, the rest queue here.

A backend that is handed more concurrent work than it has slots (llama.cpp `--parallel`, TEI
`max_concurrent_requests`) queues it internally, where the gateway cannot see it: its calls then time
out while they merely wait, and those timeouts trip its circuit. Queueing in the gateway instead keeps
the backend's own latency honest (a call's timeout covers its work only), lets the router see the queue
(and overflow to another backend when waiting here would take longer), and lets a request leave the
queue when its deadline or its client goes away. Waiters are served first come, first served.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

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
        while self._waiters and self.active < self.limit:
            self._grant_next(new_slot=True)

    async def acquire(self, timeout_s: float) -> None:
        """Take a slot, waiting at most `timeout_s` (TimeoutError) in arrival order."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(timeout_s):
                await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def release(self) -> None:
        if not self._grant_next(new_slot=False):
            self.active = max(0, self.active - 1)

    def _grant_next(self, *, new_slot: bool) -> bool:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the next waiter
                if new_slot:
                    self.active += 1
                return True
        return False
